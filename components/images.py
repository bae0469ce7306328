"""Container images the components run in, tagged with the package version (override per cluster)."""

import os

from kftune import __version__

STEP_IMAGE = os.environ.get("KFTUNE_STEP_IMAGE", f"ghcr.io/kftune/kftune-step:{__version__}")
TRAINER_IMAGE = os.environ.get("KFTUNE_TRAINER_IMAGE", f"ghcr.io/kftune/kftune-trainer:{__version__}")
