from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Output

from kftune.components.images import STEP_IMAGE


@dsl.component(base_image=STEP_IMAGE, install_kfp_package=False)
def build_prompts(config: dict, dataset: Input[Dataset], prompts: Output[Dataset], preview: Output[HTML]):
    """Render every row through the template and tokenize it; the preview shows the first prompts."""
    from kftune.steps import build_prompts as step

    prompts.metadata.update(step(config, dataset.path, prompts.path, preview.path))
