"""The train step's driver: start (or join) Ray, run `train_worker` under Ray Train's TorchTrainer,
and copy the final checkpoint into the Model artifact folder.

Ray Train names the run after its identity (`kftune.train.checkpoints.run_identity`), so with a
persistent `train.checkpoint.storage` a restarted step finds and resumes its own checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

from kftune.config import RunConfig, config_to_dict
from kftune.train import WORKER_ENV
from kftune.train.checkpoints import check_writable, run_identity
from kftune.train.loop import TRAIN_LOG_FILE, train_worker


def run_training(
    config: RunConfig, prompts_dir: str | Path, model_dir: str | Path, default_storage: str | Path
) -> dict[str, Any]:
    """Train with `config.train.workers` Ray workers; returns the train log (steps, timings, loss history).
    Checkpoints go to `train.checkpoint.storage`, or to `default_storage` when that is empty."""
    settings = config.train
    storage = storage_location(settings.checkpoint.storage, default_storage)
    check_writable(storage)
    identity = run_identity(config, prompts_dir)
    run_name = f"{config.registry.model_name}-{identity[:16]}"
    _say_what_storage_holds(storage, run_name, config.registry.model_name)
    start_ray(settings.workers * settings.cpus_per_worker)
    trainer = make_trainer(config, prompts_dir, identity, storage, run_name)
    result = trainer.fit()
    model_dir = Path(model_dir)
    if model_dir.exists():
        shutil.rmtree(model_dir)
    result.checkpoint.to_directory(str(model_dir))
    return json.loads((model_dir / TRAIN_LOG_FILE).read_text())


def start_ray(cpus: int, log_to_driver: bool = True) -> None:
    """Join the cluster at $RAY_ADDRESS (KubeRay sets it), or start Ray in this process with at least `cpus` CPUs.
    `log_to_driver`: the workers' output is shown here too (it is always in Ray's session logs).

    A local Ray's dashboard listens on a free port, named in $RAY_API_SERVER_ADDRESS here and in every worker:
    Ray's State API clients (Ray Train's placement group cleaner among them) otherwise look for the one local
    Ray and fail when another run on the machine has started its own."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    env, local = dict(WORKER_ENV), {}
    if not address:
        port = free_port()
        env["RAY_API_SERVER_ADDRESS"] = os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        local = {"num_cpus": max(os.cpu_count() or 1, cpus), "dashboard_host": "127.0.0.1", "dashboard_port": port}
    ray.init(
        address=address, log_to_driver=log_to_driver, logging_level="WARNING", runtime_env={"env_vars": env}, **local
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def make_trainer(
    config: RunConfig,
    prompts_dir: str | Path,
    identity: str,
    storage: str,
    run_name: str,
    callbacks: tuple = (),
    report_validation: bool = False,
):
    """Ray Train's TorchTrainer running `train_worker` with `config`; a run named `run_name` in `storage`
    resumes from its own checkpoints. `report_validation` makes the workers report each validation
    during training (a sweep's scheduler reads it; see kftune.sweep)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    settings = config.train
    return TorchTrainer(
        train_worker,
        train_loop_config={
            "config": config_to_dict(config),
            "prompts_dir": str(Path(prompts_dir).resolve()),
            "identity": identity,
            "report_validation": report_validation,
            "storage": storage,  # retention caches what it computes from the base here
        },
        scaling_config=ScalingConfig(
            num_workers=settings.workers,
            use_gpu=settings.use_gpu,
            resources_per_worker={"CPU": settings.cpus_per_worker},
        ),
        run_config=RayRunConfig(
            name=run_name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=settings.checkpoint.keep),
            failure_config=FailureConfig(max_failures=settings.checkpoint.max_failures),
            logging_config=LoggingConfig(
                log_level="ERROR"
            ),  # Ray Train's own INFO/WARNING chatter; our progress lines still print
            callbacks=list(callbacks),
        ),
    )


def storage_location(configured: str | None, default: str | Path) -> str:
    """Where Ray Train keeps the checkpoints, as it needs it: a URI, or an absolute path (a relative
    one is taken from the step's working directory)."""
    storage = configured or str(default)
    return storage if "://" in storage else str(Path(storage).resolve())


def _say_what_storage_holds(storage: str, run_name: str, model_name: str) -> None:
    """A fresh start next to other runs' checkpoints is announced, never silent."""
    if "://" in storage or not Path(storage).is_dir():
        return
    runs = {p.name for p in Path(storage).iterdir() if p.is_dir() and p.name.startswith(f"{model_name}-")}
    if run_name in runs:
        print(f"train: resuming run {run_name} from {storage}", flush=True)
    elif runs:
        print(
            f"train: starting run {run_name} fresh; {storage} also holds {len(runs)} other run(s) of {model_name} "
            f"({', '.join(sorted(runs)[:3])}) with a different config or data",
            flush=True,
        )
