"""How a class label is shown in reports, tables and plots."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def class_name(label: Any, class_names: Sequence[str] | None) -> str:
    """The manifest's name of an integer ``label`` (an index into ``class_names``); any other
    label (a string in saved embeddings, or an index past the list) names itself."""
    if isinstance(label, (int, np.integer)) and class_names is not None and 0 <= int(label) < len(class_names):
        return class_names[int(label)]
    return str(label)
