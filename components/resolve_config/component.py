from kfp import dsl

from kftune.components.images import STEP_IMAGE


@dsl.component(base_image=STEP_IMAGE, install_kfp_package=False)
def resolve_config(
    config: dict,
    compiled_form: dict,
    base_model: str,
    data_path: str,
    template: str,
    method: str,
    learning_rate: float,
    epochs: int,
    batch_size: int,
    workers: int,
    zero_stage: int,
    registered_model_name: str,
    gate_metric: str,
    gate_margin: float,
) -> dict:
    """The run's config: `config` with the run form's values written in where they differ from the compiled ones."""
    form = {name: value for name, value in locals().items() if name not in ("config", "compiled_form")}
    from kftune.steps import resolve_config as step

    return step(config, compiled_form, form)
