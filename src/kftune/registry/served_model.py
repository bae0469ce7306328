"""The served model, defined from code (MLflow's models-from-code): MLflow logs this file with the
version and runs it when the version is loaded, so no pickled class ties a version to the kftune
release that registered it. kftune itself comes from the version's `code_paths`."""

from mlflow.models import set_model

from kftune.registry.pyfunc_model import TunedModel

set_model(TunedModel())
