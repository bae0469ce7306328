"""Training: the per-worker loop (`loop.py`) and its Ray Train launcher (`launch.py`)."""

# Ray workers inherit these (locally and in a RayJob): quiet tokenizers' fork warning, keep HF offline (nothing is downloaded).
WORKER_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}  # plain prints: progress lines once, not twice

TRAIN_LOG_FILE = "train_log.json"
"""Written into the Model folder by rank 0: steps, timings, loss curve."""
