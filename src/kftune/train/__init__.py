"""Training: the per-worker loop (`loop.py`) and its Ray Train launcher (`launch.py`)."""
