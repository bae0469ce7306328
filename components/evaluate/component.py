from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from kftune.components.images import STEP_IMAGE


@dsl.component(base_image=STEP_IMAGE, install_kfp_package=False)
def evaluate(
    config: dict,
    prompts: Input[Dataset],
    model: Input[Model],
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    report: Output[HTML],
):
    """Score the tuned and the base model on the test split; the report shows the gain."""
    from kftune.steps import evaluate as step

    for name, value in step(config, prompts.path, model.path, evaluation.path, report.path).items():
        metrics.log_metric(name, value)
