from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Model, Output

from kftune.components.images import STEP_IMAGE


@dsl.component(base_image=STEP_IMAGE, install_kfp_package=False)
def register(
    config: dict,
    dataset: Input[Dataset],
    model: Input[Model],
    evaluation: Input[Artifact],
    report: Input[HTML],
    pipeline_run_id: str,
    summary: Output[Artifact],
):
    """Log to MLflow, register a model version as `challenger`, promote to `champion` if it wins."""
    import json

    from kftune.steps import register as step

    result = step(config, dataset.path, model.path, evaluation.path, report.path, pipeline_run_id)
    with open(summary.path, "w") as handle:
        json.dump(result, handle, indent=2)
    summary.metadata.update({k: v for k, v in result["registered"].items() if k != "aliases"})
