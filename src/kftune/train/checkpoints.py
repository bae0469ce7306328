"""What a training checkpoint holds besides the engine's state, and how a run finds its own.

A checkpoint folder (one per `train.checkpoint.every_steps`, gathered by Ray Train from every
worker) holds the engine state (`kftune.train.engines`), `trainer_state.json` (step, data position,
loss history, and the run identity it belongs to) and one RNG file per worker. The run identity is
a hash of everything that shapes the trained weights (config sections and the prompts data), and
Ray Train's run name is derived from it: a restarted run with the same config, data and storage
resumes; a changed one starts apart from it and says so.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import torch

from kftune.config import RunConfig, config_to_dict
from kftune.errors import KftuneError
from kftune.prompts.build import META_FILE, split_file

STATE_FILE = "trainer_state.json"
IDENTITY_SECTIONS = ("model", "data", "prompt", "method", "train", "retention")
IDENTITY_IGNORED_TRAIN_KEYS = ("checkpoint", "log_every_steps", "cpus_per_worker")


def run_identity(config: RunConfig, prompts_dir: str | Path) -> str:
    """sha256 over the sections that shape the weights and the prompts the run trains on."""
    data = config_to_dict(config)
    shaping = {section: data[section] for section in IDENTITY_SECTIONS if section in data}
    for key in IDENTITY_IGNORED_TRAIN_KEYS:
        shaping["train"].pop(key, None)
    digest = hashlib.sha256(json.dumps(shaping, sort_keys=True).encode())
    for path in (split_file(prompts_dir, "train"), Path(prompts_dir) / META_FILE):
        digest.update(_file_sha256(path))
    return digest.hexdigest()


def _file_sha256(path: Path) -> bytes:
    """In blocks: a large train split is never read whole into memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.digest()


def check_writable(storage: str) -> None:
    """Fail before Ray starts when checkpoints could not be written (a local path, a PVC mount, or s3://)."""
    import pyarrow.fs

    try:
        filesystem, root = pyarrow.fs.FileSystem.from_uri(storage if "://" in storage else str(Path(storage).resolve()))
        filesystem.create_dir(root, recursive=True)
        probe = f"{root}/.kftune-write-test"
        with filesystem.open_output_stream(probe) as stream:
            stream.write(b"ok")
        filesystem.delete_file(probe)
    except Exception as exc:  # pyarrow raises OSError, ArrowInvalid, PermissionError... depending on the filesystem
        raise KftuneError(f"train.checkpoint.storage: cannot write to {storage}: {exc}") from None


def save_trainer_state(directory: Path, rank: int, state: dict[str, Any]) -> None:
    """Rank 0 writes the shared state; every worker writes its own RNG streams (dropout differs per worker)."""
    if rank == 0:
        (directory / STATE_FILE).write_text(json.dumps(state))
    torch.save(
        {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
        directory / f"rng_rank{rank}.pt",
    )


def load_trainer_state(directory: Path, rank: int, identity: str, world: int) -> dict[str, Any]:
    """The state of a checkpoint this run wrote; anything else is an error, never a silent fresh start."""
    path = directory / STATE_FILE
    try:
        state = json.loads(path.read_text())
        rng = torch.load(directory / f"rng_rank{rank}.pt", weights_only=False)
    except (OSError, ValueError, RuntimeError) as exc:
        raise KftuneError(f"checkpoint {directory} is unreadable ({exc}); delete it to start over") from None
    if state.get("identity") != identity:
        raise KftuneError(
            f"{path}: written by another run (identity {str(state.get('identity'))[:12]}, this run {identity[:12]})"
        )
    if state.get("workers") != world:
        raise KftuneError(
            f"{path}: written by {state.get('workers')} workers, this run has {world}; set train.workers back to resume"
        )
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state
