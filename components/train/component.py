from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Model, Output

from kftune.components.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def train(
    config: dict,
    prompts: Input[Dataset],
    model: Output[Model],
    sweep_report: Output[HTML],
    run_name: str,
    volume_claim: str,
):
    """Fine-tune under Ray Train; the Model artifact holds adapter (or weights), tokenizer and resolved config.
    With a `sweep` section: the sweep's best trial's model, and the sweep's report in `sweep_report`.
    `volume_claim` is the PVC this pod mounts (a per-run parameter): a RayJob's pods mount the same one."""
    from kftune.kube.settings import with_volume_claim
    from kftune.steps import train as step

    model.metadata.update(
        step(with_volume_claim(config, volume_claim), prompts.path, model.path, run_name, sweep_report.path)
    )
