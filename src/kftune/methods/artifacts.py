"""How a tuned model is written and read back. Three formats cover every method:

- WHOLE_MODEL: `save_pretrained` of the whole model (full and freezing methods, merged LoRA);
  it reloads like any Hugging Face model folder.
- PEFT_ADAPTER: peft's own adapter files (`adapter_config.json`, `adapter_model.safetensors`),
  reloaded onto the base model with `PeftModel.from_pretrained`.
- TRAINED_PARAMETERS: for hand-written methods that add modules peft does not know (adapters,
  layer prompts) or train a small subset (bitfit): only the trained tensors
  (`trained_parameters.safetensors`) and `kftune_method.json` naming the base model and the method.
  Reloading applies the method to a fresh base model and loads those tensors into it.

`load(model_dir, options, task, load_base)` gets `load_base(path=None)`: the seeded base model
with its task head, from `path` or from the run's base model when None.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kftune.errors import KftuneError

TRAINED_PARAMETERS_FILE = "trained_parameters.safetensors"
METHOD_FILE = "kftune_method.json"


@dataclass(frozen=True)
class Artifact:
    save: Callable
    """(model, options, out_dir) -> None"""
    load: Callable
    """(model_dir, options, task, load_base) -> model"""


def save_whole_model(model, options, out: Path) -> None:
    model.save_pretrained(str(out), safe_serialization=True)


def load_whole_model(model_dir: Path, options, task: str, load_base: Callable):
    return load_base(model_dir)


def load_peft_adapter(model_dir: Path, options, task: str, load_base: Callable):
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(), str(model_dir))


def save_trained_parameters(model, options, out: Path) -> None:
    from safetensors.torch import save_file

    trained = {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}
    save_file(trained, str(out / TRAINED_PARAMETERS_FILE))
    method = {
        "base_model": model.config._name_or_path,
        "method": options.model_dump(),
        "trained_parameters": sorted(trained),
    }
    (out / METHOD_FILE).write_text(json.dumps(method, indent=2))


def load_trained_parameters(model_dir: Path, options, task: str, load_base: Callable):
    from safetensors.torch import load_file

    from kftune.methods import apply_method

    model = apply_method(load_base(), options, task)
    trained = load_file(str(Path(model_dir) / TRAINED_PARAMETERS_FILE))
    unexpected = model.load_state_dict(trained, strict=False).unexpected_keys
    missing = {name for name, p in model.named_parameters() if p.requires_grad} - set(trained)
    if unexpected or missing:
        raise KftuneError(
            f"{model_dir}: {TRAINED_PARAMETERS_FILE} does not fit method {options.name!r} (unexpected {unexpected[:3]}, missing {sorted(missing)[:3]})"
        )
    return model


WHOLE_MODEL = Artifact(save_whole_model, load_whole_model)
PEFT_ADAPTER = Artifact(save_whole_model, load_peft_adapter)  # a PeftModel's save_pretrained writes the adapter only
TRAINED_PARAMETERS = Artifact(save_trained_parameters, load_trained_parameters)
