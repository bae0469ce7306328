from typing import NamedTuple

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
    method_options: dict,
    learning_rate: float,
    epochs: int,
    batch_size: int,
    workers: int,
    gpu_nodes: int,
    gpus_per_node: int,
    zero_stage: int,
    registered_model_name: str,
    gate_metric: str,
    gate_margin: float,
) -> NamedTuple("Resolved", [("config", dict), ("data_source", str), ("base_model", str)]):
    """The run's config: `config` with the run form's values written in where they differ from the compiled ones;
    and where its data and base model are, for the lineage of what the run produces."""
    form = {name: value for name, value in locals().items() if name not in ("config", "compiled_form")}
    from collections import namedtuple

    from kftune.steps import resolve_config as step

    resolved = step(config, compiled_form, form)
    Resolved = namedtuple("Resolved", ["config", "data_source", "base_model"])
    return Resolved(resolved, resolved["data"]["path"], resolved["model"]["name_or_path"])
