"""Name-valued settings (backbones, and the registered names of `dml.registries`) checked against
the names that exist, so a typo fails when the config is loaded, with the closest valid name.

Torch-free on purpose: the config imports this module, and `dml prepare` never needs torch.
Backbone names come from timm's registry, imported only when a backbone is checked.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

MAX_LISTED = 20  # longer lists (timm's ~1,400 models) are described, not printed


def unknown_name(value: object, names: Sequence[str], what: str, listing: str | None = None, where: str = "") -> str:
    """The message for ``value`` not among ``names``: the closest valid name, then the valid ones
    (or ``listing`` when given, for lists too long to print); ``where`` follows the value."""
    close = difflib.get_close_matches(str(value).lower(), [n.lower() for n in names], n=1, cutoff=0.6)
    hint = f"; did you mean '{next(n for n in names if n.lower() == close[0])}'?" if close else ""
    if listing is None:
        listing = ", ".join(names) if len(names) <= MAX_LISTED else f"{', '.join(names[:MAX_LISTED])}, ..."
    return f"unknown {what} {value!r}{where}{hint} (valid: {listing})"


def check_backbone(name: str) -> str:
    """Return ``name`` if timm can build it (``arch`` or ``arch.pretrained_tag``), else raise
    ValueError naming the closest timm model (or tag)."""
    import timm

    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        raise ValueError(unknown_name(arch, timm.list_models(), "timm backbone", "see timm.list_models()"))
    if tag and name not in timm.list_pretrained(f"{arch}.*"):
        tags = timm.list_pretrained(f"{arch}.*")
        raise ValueError(unknown_name(name, tags, f"pretrained tag of {arch}", ", ".join(tags) or "none"))
    return name
