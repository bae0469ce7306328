"""KFP components, one folder per pipeline step; each is a thin typed wrapper over `kftune.steps`.

Installed as `kftune.components` (see pyproject's package-dir), so the import name stays namespaced.
"""

from kftune.components.build_prompts.component import build_prompts
from kftune.components.evaluate.component import evaluate
from kftune.components.fingerprint_data.component import fingerprint_data
from kftune.components.prepare_data.component import prepare_data
from kftune.components.register.component import register
from kftune.components.resolve_config.component import resolve_config
from kftune.components.train.component import train

__all__ = ["build_prompts", "evaluate", "fingerprint_data", "prepare_data", "register", "resolve_config", "train"]
