"""What a logged version carries so that it installs and loads where it is served, not only where it
was trained: kftune's own code (MLflow `code_paths`; no package index has kftune), pinned pip
requirements for the serving code path only, a signature and an input example built from the
template's fields, and the training data as an MLflow dataset whose digest is the data fingerprint.

MLflow references: models from code (https://mlflow.org/docs/latest/ml/model/models-from-code/),
code_paths and dependency management (https://mlflow.org/docs/latest/ml/model/dependencies/),
signatures (https://mlflow.org/docs/latest/ml/model/signatures/), datasets
(https://mlflow.org/docs/latest/ml/dataset/).
"""

from __future__ import annotations

import importlib.metadata
import shutil
from pathlib import Path
from typing import Any

import kftune
from kftune.config import RunConfig
from kftune.models import PACKAGED_MODELS

SERVED_MODEL_FILE = Path(__file__).with_name("served_model.py")
"""The models-from-code file: MLflow logs it and runs it at load time to build the pyfunc."""

# What the serving code path imports (kftune.models, methods, prompts, evaluate): not Ray, kfp,
# DeepSpeed or kubernetes, which kftune's own requirements also name.
SERVING_DISTRIBUTIONS = ("torch", "transformers", "tokenizers", "peft", "safetensors", "pydantic", "pyyaml")
NOT_SERVED = ("components", "pipelines")  # kftune.components / kftune.pipelines import kfp
MAX_DIGEST_CHARS = 36  # MLflow's datasets.digest column
EXAMPLE_ROWS = 2


def _pinned(distribution: str) -> str:
    """`name==version` without a local label (`2.13.0+cpu` -> `2.13.0`): the serving side picks its own build."""
    return f"{distribution}=={importlib.metadata.version(distribution).split('+')[0]}"


def pip_requirements(config: RunConfig) -> list[str]:
    """The serving stack pinned to the versions this version was trained and evaluated with, plus the
    package that ships a packaged base model (a LoRA version loads on top of it)."""
    requirements = [_pinned(name) for name in SERVING_DISTRIBUTIONS]
    if config.model.name_or_path in PACKAGED_MODELS:
        package = PACKAGED_MODELS[config.model.name_or_path][0]
        distributions = importlib.metadata.packages_distributions().get(package, [])
        requirements += [_pinned(name) for name in distributions]
    return requirements


def copy_kftune_code(out_dir: Path) -> Path:
    """A copy of the installed kftune package without the pipeline-only subpackages, for `code_paths`."""
    source = Path(kftune.__file__).parent

    def skipped(folder: str, names: list[str]) -> list[str]:
        top = Path(folder) == source
        return [n for n in names if n == "__pycache__" or (top and n in NOT_SERVED)]

    return Path(shutil.copytree(source, out_dir / "kftune", ignore=skipped))


def input_columns(config: RunConfig) -> list[str]:
    """The input columns: each template field (required ones first) read from its data column; a causal LM
    without labels continues a `prompt`."""
    from kftune.prompts.templates import resolve_template

    template = resolve_template(config.prompt.template)
    if not config.has_labels:
        return ["prompt"]
    return [config.columns_for(f) for f in template.fields + template.optional]


def signature(config: RunConfig):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Map

    # Every column optional to MLflow's own input check: the model names a missing one itself, in an error
    # that MLServer answers with 400 too (`pyfunc_model.bad_request`); MLflow's check would give it a 500 there.
    columns = ["prompt", "response"] if config.stage == "reward" else input_columns(config)
    inputs = Schema([ColSpec(DataType.string, c, required=False) for c in columns])
    if config.stage == "reward":  # kftune.alignment.serving
        outputs = [ColSpec(DataType.double, "reward")]
    elif config.model.task == "sequence_classification":
        outputs = [ColSpec(DataType.string, "label"), ColSpec(DataType.double, "score")]
    elif config.has_labels:
        outputs = [ColSpec(DataType.string, "label"), ColSpec(Map(DataType.double), "scores")]
    else:
        outputs = [ColSpec(DataType.string, "generated")]
    return ModelSignature(inputs=inputs, outputs=Schema(outputs))


def input_example(config: RunConfig, dataset_dir: str | Path):
    """The first test rows as a served request has them: data columns, or rendered prompts."""
    import pandas as pd

    from kftune.data.prepare import read_split
    from kftune.prompts.templates import resolve_template

    template = resolve_template(config.prompt.template)
    rows = read_split(dataset_dir, "test")[:EXAMPLE_ROWS]
    if config.stage != "sft":
        from kftune.alignment.serving import input_example as alignment_example

        return alignment_example(config, rows)
    if not config.has_labels:
        return pd.DataFrame({"prompt": [template.render(row)[0][0] for row in rows]})
    fields = [f for f in template.fields + template.optional if all(row.get(f) is not None for row in rows)]
    return pd.DataFrame({config.columns_for(f): [str(row[f]) for row in rows] for f in fields})


def training_dataset(config: RunConfig, dataset_sha256: str):
    """The data source as an MLflow dataset: its digest is the data fingerprint (cut to what MLflow
    stores), its schema the template's input columns."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    return MetaDataset(
        source=resolve_dataset_source(config.data.path),
        name=Path(config.data.path).name,
        digest=dataset_sha256[:MAX_DIGEST_CHARS],
        schema=signature(config).inputs,
    )


def log_served_model(config: RunConfig, artifacts: dict[str, str], dataset_dir: str | Path | None) -> Any:
    """Log the version as MLflow's models-from-code pyfunc with kftune's code and requirements; returns ModelInfo."""
    import tempfile

    import mlflow

    with tempfile.TemporaryDirectory() as scratch:
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(SERVED_MODEL_FILE),
            artifacts=artifacts,
            code_paths=[str(copy_kftune_code(Path(scratch)))],
            pip_requirements=pip_requirements(config),
            signature=signature(config),
        )
    if dataset_dir:
        _attach_input_example(info, input_example(config, dataset_dir))
    return info


def _attach_input_example(info, example) -> None:
    """Write the input example into the logged model. Given to `log_model`, MLflow would check it by
    loading the model and predicting, here in the register step, whose resources are sized for
    bookkeeping, not for the model; tests/test_serving_env.py serves it from a fresh environment instead."""
    import tempfile

    from mlflow import MlflowClient
    from mlflow.models import Model
    from mlflow.models.utils import _save_example

    model = Model.load(info.model_uri)
    with tempfile.TemporaryDirectory() as scratch:
        _save_example(model, example, scratch)
        model.save(str(Path(scratch) / "MLmodel"))
        MlflowClient().log_model_artifacts(info.model_id, scratch)
