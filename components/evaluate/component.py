from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from kftune.components.images import TRAINER_IMAGE


@dsl.component(
    base_image=TRAINER_IMAGE, install_kfp_package=False
)  # the model must fit: CUDA torch, GPUs from cluster.evaluate
def evaluate(
    config: dict,
    prompts: Input[Dataset],
    model: Input[Model],
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
    report: Output[HTML],
):
    """Score the tuned and the base model on the test split; the report shows the gain. The KFP UI shows
    `metrics` as scalars and `confusion` (the tuned model's, classification only) as a confusion matrix."""
    from kftune.steps import evaluate as step, tuned_confusion_matrix

    for name, value in step(config, prompts.path, model.path, evaluation.path, report.path).items():
        metrics.log_metric(name, value)
    found = tuned_confusion_matrix(evaluation.path)
    if found:
        confusion.log_confusion_matrix(*found)
