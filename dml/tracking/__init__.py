"""Experiment trackers (MLflow, TensorBoard) that every stage can log to, beside the files it
always writes (``metrics.jsonl``, reports). The tracking libraries are an optional extra
(``pip install 'dml-pipeline[tracking]'``) and are imported only when tracking is turned on.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from dml.errors import ConfigError

EXTRA_HINT = "pip install 'dml-pipeline[tracking]'"


def require(module: str, switch: str) -> ModuleType:
    """Import ``module`` for the feature turned on by config key ``switch``.

    Raises `ConfigError` (one line naming the switch and the extra to install) when the
    package is missing.
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise ConfigError(f"{switch} needs the {package} package, which is not installed: {EXTRA_HINT}") from None
