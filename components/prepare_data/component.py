from kfp import dsl
from kfp.dsl import Dataset, Markdown, Output

from kftune.components.images import STEP_IMAGE


@dsl.component(base_image=STEP_IMAGE, install_kfp_package=False)
def prepare_data(config: dict, data_fingerprint: str, dataset: Output[Dataset], data_card: Output[Markdown]):
    """Read, map, clean and split the training data; the data card lists counts and dropped rows.
    `data_fingerprint` (from fingerprint_data) is part of KFP's cache key: changed data is never served from cache."""
    from kftune.steps import prepare_data as step

    dataset.metadata.update(step(config, dataset.path, data_card.path, data_fingerprint))
