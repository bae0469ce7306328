from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from kftune.components.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def train(config: dict, prompts: Input[Dataset], model: Output[Model], run_name: str):
    """Fine-tune under Ray Train; the Model artifact holds adapter (or weights), tokenizer and resolved config."""
    from kftune.steps import train as step

    model.metadata.update(step(config, prompts.path, model.path, run_name))
