"""kftune: fine-tune language models through one Kubeflow pipeline, from data to an MLflow-registered model."""

__version__ = "0.1.0"
