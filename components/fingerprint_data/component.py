from kfp import dsl

from kftune.components.images import STEP_IMAGE


@dsl.component(base_image=STEP_IMAGE, install_kfp_package=False)
def fingerprint_data(config: dict) -> str:
    """The data files' fingerprint, the input that keys prepare_data's cache; a fresh value for data that has none."""
    from kftune.steps import fingerprint_data as step

    return step(config)
