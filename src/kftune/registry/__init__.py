"""Model registry: MLflow runs, versions, aliases and the promotion gate."""
