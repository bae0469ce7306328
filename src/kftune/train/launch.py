"""The train step's driver: start (or join) Ray, run `train_worker` under Ray Train's TorchTrainer,
and copy the final checkpoint into the Model artifact folder."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from kftune.config import RunConfig, config_to_dict
from kftune.train import WORKER_ENV
from kftune.train.loop import TRAIN_LOG_FILE, train_worker



def run_training(config: RunConfig, prompts_dir: str | Path, model_dir: str | Path, storage_dir: str | Path, run_name: str) -> dict[str, Any]:
    """Train with `config.train.workers` Ray workers; returns the train log (steps, timings, loss curve)."""
    import ray
    from ray.train import LoggingConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchTrainer

    settings = config.train
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")  # set on a cluster (KubeRay); empty: start Ray in-process
        local_cpus = None if address else max(os.cpu_count() or 1, settings.workers * settings.cpus_per_worker)
        ray.init(address=address, num_cpus=local_cpus, log_to_driver=True, logging_level="WARNING",
                 runtime_env={"env_vars": WORKER_ENV})
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": config_to_dict(config), "prompts_dir": str(Path(prompts_dir).resolve())},
        scaling_config=ScalingConfig(
            num_workers=settings.workers,
            use_gpu=settings.use_gpu,
            resources_per_worker={"CPU": settings.cpus_per_worker},
        ),
        run_config=RayRunConfig(
            name=run_name,
            storage_path=str(Path(storage_dir).resolve()),
            logging_config=LoggingConfig(log_level="ERROR"),  # Ray Train's own INFO/WARNING chatter; our progress lines still print
        ),
    )
    result = trainer.fit()
    model_dir = Path(model_dir)
    if model_dir.exists():
        shutil.rmtree(model_dir)
    result.checkpoint.to_directory(str(model_dir))
    return json.loads((model_dir / TRAIN_LOG_FILE).read_text())
