"""EWC's diagonal Fisher information of the base model on general data, computed once and cached.

F_w = mean over rows of (d loss_row / d w)^2, the empirical Fisher of the pre-training objective
(next-token or masked-LM loss of each general row; for an encoder classifier, whose head is new, the
Fisher of its sentence embedding, see `kftune.retention.embedding`), normalised to mean 1 over all
weights so that `retention.ewc.strength` is on the scale of L2-SP's alpha.

The cache is a safetensors file named by a content hash of the base model's files and the general
data (and how many rows of it); its metadata records both fingerprints, so a file made for another
base model or other data is refused by name of the field that points at it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from kftune.errors import KftuneError
from kftune.prompts.collate import Collator

CACHE_FOLDER = "retention"


def model_fingerprint(model_path: str | Path) -> str:
    """sha256 over the model's files (a folder's top-level files, or one GGUF file), each by its own fingerprint."""
    from kftune.data.fingerprint import file_fingerprint

    path = Path(model_path)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}={file_fingerprint(str(file))}\n".encode())
    return "sha256:" + digest.hexdigest()


def general_fingerprint(lines: list[str], task: str, max_length: int) -> str:
    """The general rows as the Fisher sees them."""
    return "sha256:" + hashlib.sha256(json.dumps([task, max_length, lines]).encode()).hexdigest()


def cache_path(storage: str | Path, base: str, general: str) -> Path:
    key = hashlib.sha256(f"{base}\n{general}".encode()).hexdigest()[:24]
    return Path(storage) / CACHE_FOLDER / f"fisher-{key}.safetensors"


def check_fisher_file(path: str | Path, base: str, general: str | None = None) -> None:
    """Refuse a Fisher file made for another base model (or, when `general` is given, other general data)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise KftuneError(f"retention.ewc.fisher_file: {path} is not a file")
    try:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as exc:  # safetensors' own errors on a file that is not one of its
        raise KftuneError(f"retention.ewc.fisher_file: {path} is not a safetensors Fisher file ({exc})") from None
    if metadata.get("base") != base:
        raise KftuneError(
            f"retention.ewc.fisher_file: {path} was made for another base model ({metadata.get('base', 'unknown')}); "
            f"this run's base is {base}. Leave the field empty to compute (and cache) the Fisher for this base"
        )
    if general is not None and metadata.get("general") != general:
        raise KftuneError(
            f"retention.ewc.fisher_file: {path} was made on other general data ({metadata.get('general')}); "
            f"this run's retention.general_data / general_rows give {general}"
        )


def load_fisher(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def save_fisher(path: Path, fisher: dict[str, torch.Tensor], base: str, general: str, rows: int) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_file(fisher, str(partial), metadata={"base": base, "general": general, "rows": str(rows)})
    partial.replace(path)  # whole or absent: a concurrent reader never sees half a file


def diagonal_fisher(model, rows: list[dict], task: str, pad_token_id: int) -> dict[str, torch.Tensor]:
    """The normalised empirical Fisher of every trainable parameter of `model` (the base), one row at a time."""
    from kftune.retention.embedding import gaussian_fisher_loss
    from kftune.train.losses import loss_items, summed_loss

    collate = Collator(pad_token_id, task)
    parameters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in parameters.items()}
    device = next(model.parameters()).device
    noise = torch.Generator().manual_seed(0)  # fixed: the cache key names the rows, not a seed
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the model as it predicts
    for row in rows:
        batch = {k: v.to(device) for k, v in collate([row]).items()}
        counted = int(loss_items(batch, task))
        if not counted:
            continue
        model.zero_grad(set_to_none=True)
        if task == "sequence_classification":
            gaussian_fisher_loss(model, batch, noise).backward()
        else:
            (summed_loss(model, batch, task) / counted).backward()
        for name, parameter in parameters.items():
            if parameter.grad is not None:
                fisher[name] += parameter.grad.float().pow(2)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    mean = torch.stack([f.sum() for f in fisher.values()]).sum() / sum(f.numel() for f in fisher.values())
    if not mean > 0:
        raise KftuneError(
            "retention.ewc: the Fisher is zero on every weight (general rows too short to predict anything?)"
        )
    return {name: (f / mean).contiguous() for name, f in fisher.items()}
