"""Name -> class registries: every name a config may give for a margin, a pair loss, a miner, a
pooling or a data source is an entry here, and nothing else is accepted (stage launchers, which
live in `pipeline`, are registered the same way in `pipeline.registries`).

An entry names its class by import path (``"dml.losses.margins:ArcFace"``), resolved on first
use, so this module and the config that reads its names stay torch-free (`dml prepare` never
imports torch). ``params`` maps the caller's settings (for losses and miners the whole
`dml.config.DMLConfig`) to the constructor's keyword arguments, so building is one lookup and
an unknown name is an error, never a fallback. The config's allowed values are these names
(`registered_name`); the README's table of them is `registry_table()`.

To add a component: write the class, add one ``REGISTRY.add(...)`` line below and a test case
(the registry tests are parametrised over the entries, so a new one without a case fails).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic_core import PydanticCustomError, core_schema

from dml.names import unknown_name


@dataclass(frozen=True)
class Entry:
    """One registered name: ``target`` is ``"package.module:Class"``; ``params(settings)`` gives
    the constructor's keyword arguments (None: none); ``fits`` says which mined set a miner
    yields or a pair loss takes (``"pairs"`` or ``"triplets"``); ``summary`` is the README line."""

    name: str
    target: str
    summary: str
    params: Callable[[Any], dict[str, Any]] | None = None
    fits: str = ""


class Registry:
    """The entries of one kind of component, chosen by the config key ``key``."""

    def __init__(self, kind: str, key: str):
        self.kind, self.key = kind, key
        self._entries: dict[str, Entry] = {}

    def add(
        self,
        name: str,
        target: str,
        summary: str,
        params: Callable[[Any], dict[str, Any]] | None = None,
        fits: str = "",
    ) -> None:
        """Register ``name``; raises ValueError if it is taken or ``target`` is not ``module:attr``."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        if target.count(":") != 1:
            raise ValueError(f"{self.kind} {name!r}: target must be 'module:Class', got {target!r}")
        self._entries[name] = Entry(name, target, summary, params, fits)

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order."""
        return tuple(self._entries)

    def entries(self) -> tuple[Entry, ...]:
        """The registered entries, in registration order."""
        return tuple(self._entries.values())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def entry(self, name: str) -> Entry:
        """The entry of ``name``; raises ValueError naming the closest registered name."""
        found = self._entries.get(name)
        if found is None:
            raise ValueError(unknown_name(name, self.names(), self.kind))
        return found

    def get(self, name: str) -> type:
        """The class registered as ``name`` (imported now); raises ValueError for unknown names."""
        module, _, attr = self.entry(name).target.partition(":")
        return getattr(importlib.import_module(module), attr)

    def build(self, name: str, *args: Any, settings: Any = None, **kwargs: Any) -> Any:
        """``get(name)(*args, **params(settings), **kwargs)``: an instance of the entry's class."""
        entry = self.entry(name)
        params = entry.params(settings) if entry.params is not None else {}
        return self.get(name)(*args, **params, **kwargs)


class RegisteredName:
    """A pydantic type for a config key whose value must be a name in ``registries`` (or one of
    ``extra`` values such as ``"auto"``). The JSON schema lists the names as an enum; an unknown
    name fails validation with the closest valid one."""

    def __init__(self, *registries: Registry, extra: Sequence[str] = (), check: Callable[[str], Any] | None = None):
        self.registries, self.extra, self.check = registries, tuple(extra), check

    def names(self) -> list[str]:
        """The accepted values: ``extra`` first, then every registry's names in order."""
        return [*self.extra, *(n for registry in self.registries for n in registry.names())]

    def validate(self, value: str) -> str:
        """``value`` if accepted (by ``check`` when given, else by membership); raises
        PydanticCustomError ``unknown_name`` whose message names the closest valid value."""
        if self.check is not None:
            try:
                self.check(value)
            except ValueError as exc:
                raise PydanticCustomError("unknown_name", str(exc)) from None
            return value
        if value not in self.names():
            kind = " or ".join(r.kind for r in self.registries)
            raise PydanticCustomError("unknown_name", unknown_name(value, self.names(), kind))
        return value

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self.validate, core_schema.str_schema())

    def __get_pydantic_json_schema__(self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler) -> dict:
        return {"type": "string", "enum": self.names()}


def _loss(config: Any) -> Any:
    return config.loss


MARGINS = Registry("margin", "loss.kind")
MARGINS.add(
    "arcface",
    "dml.losses.margins:ArcFace",
    "additive angular margin cos(theta + m) (loss.scale, loss.margin)",
    lambda c: {"s": _loss(c).scale, "m": _loss(c).margin},
)
MARGINS.add(
    "cosface",
    "dml.losses.margins:CosFace",
    "additive cosine margin cos(theta) - m (loss.scale, loss.margin)",
    lambda c: {"s": _loss(c).scale, "m": _loss(c).margin},
)
MARGINS.add(
    "sphereface",
    "dml.losses.margins:SphereFace",
    "multiplicative angular margin cos(m theta) (loss.scale, loss.margin >= 1)",
    lambda c: {"s": _loss(c).scale, "m": _loss(c).margin},
)
MARGINS.add(
    "combined",
    "dml.losses.margins:CombinedMargin",
    "cos(m1 theta + m2) - m3 (loss.scale, loss.combined_margins)",
    lambda c: dict(zip(("s", "m1", "m2", "m3"), (_loss(c).scale, *_loss(c).combined_margins), strict=True)),
)
MARGINS.add(
    "normsoftmax",
    "dml.losses.margins:NormalizedSoftmax",
    "no margin, scaled cosine (loss.scale)",
    lambda c: {"s": _loss(c).scale},
)

PAIR_LOSSES = Registry("pair loss", "loss.kind")
PAIR_LOSSES.add(
    "triplet",
    "dml.losses.pairs:TripletMarginLoss",
    "triplet margin loss (loss.triplet_margin, loss.mining)",
    lambda c: {"margin": _loss(c).triplet_margin, "mining": _loss(c).mining},
    fits="triplets",
)
PAIR_LOSSES.add(
    "contrastive",
    "dml.losses.pairs:ContrastiveLoss",
    "contrastive loss (loss.pos_margin, loss.neg_margin)",
    lambda c: {"pos_margin": _loss(c).pos_margin, "neg_margin": _loss(c).neg_margin},
    fits="pairs",
)
PAIR_LOSSES.add(
    "multisimilarity",
    "dml.losses.pairs:MultiSimilarityLoss",
    "multi-similarity loss (loss.ms_alpha, loss.ms_beta, loss.ms_base)",
    lambda c: {"alpha": _loss(c).ms_alpha, "beta": _loss(c).ms_beta, "base": _loss(c).ms_base},
    fits="pairs",
)

MINERS = Registry("miner", "loss.miner")
MINERS.add(
    "multisimilarity",
    "dml.losses.miners:MultiSimilarityMiner",
    "multi-similarity pair mining (loss.miner_epsilon); with contrastive, multisimilarity",
    lambda c: {"epsilon": _loss(c).miner_epsilon},
    fits="pairs",
)
MINERS.add(
    "distance_weighted",
    "dml.losses.miners:DistanceWeightedMiner",
    "distance-weighted negatives (loss.miner_cutoff, loss.miner_nonzero_cutoff); with triplet",
    lambda c: {"cutoff": _loss(c).miner_cutoff, "nonzero_loss_cutoff": _loss(c).miner_nonzero_cutoff, "seed": c.seed},
    fits="triplets",
)

POOLINGS = Registry("pooling", "model.pooling")
POOLINGS.add("avg", "dml.models.pooling:AvgPool", "global average pooling (SPoC)")
POOLINGS.add("max", "dml.models.pooling:MaxPool", "global max pooling (MAC)")
POOLINGS.add(
    "gem",
    "dml.models.pooling:GeM",
    "generalised-mean pooling, learnable exponent",
    lambda s: {"p": s["gem_p"], "learnable": s["gem_learnable"]},
)
POOLINGS.add(
    "cls",
    "dml.models.tokens:ClassTokenPool",
    "class token of a ViT-family backbone (there the others pool its patch tokens)",
)


def parse_pooling(spec: str) -> list[str]:
    """Split a pooling spec such as ``"gem"`` or ``"avg+max+gem"`` into registered pooling names.

    Names are case-insensitive and must be distinct; the order is kept because in a
    combination the first descriptor receives any leftover embedding dimensions.
    Raises ValueError naming the closest valid name for an unknown part.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"pooling must be a non-empty string like 'gem' or 'avg+max+gem', got {spec!r}")
    names = [part.strip().lower() for part in spec.split("+")]
    valid = POOLINGS.names()
    unknown = [name for name in names if name not in valid]
    if unknown:
        raise ValueError(
            unknown_name(
                unknown[0],
                valid,
                "pooling",
                f"{', '.join(valid)} or several joined by '+', e.g. 'avg+max+gem'",
                f" in {spec!r}" if len(names) > 1 else "",
            )
        )
    if len(set(names)) != len(names):
        raise ValueError(f"pooling {spec!r} repeats a descriptor; each of {', '.join(valid)} may appear once")
    return names


SOURCES = Registry("source kind", "prepare.source.kind")
SOURCES.add("folder", "dml.data.sources:FolderSource", "a folder per class (or split/class) of image files")
SOURCES.add("csv", "dml.data.sources:TableSource", "a CSV manifest: path, label[, split] columns")
SOURCES.add("parquet", "dml.data.sources:TableSource", "a Parquet manifest: path, label[, split] columns")
SOURCES.add(
    "idx",
    "dml.data.sources:IdxSource",
    "IDX files (MNIST / Fashion-MNIST layout)",
    lambda s: {"class_names": s["class_names"]},
)
SOURCES.add("omniglot", "dml.data.sources:OmniglotSource", "Omniglot npz arrays (images_*.npz)")
SOURCES.add("recordio", "dml.data.recordio:RecordIOSource", "an insightface RecordIO set (.rec/.idx)")

REGISTRIES = (MARGINS, PAIR_LOSSES, MINERS, POOLINGS, SOURCES)  # pipeline.registries adds LAUNCHERS


def registry_table(registries: Sequence[Registry] = REGISTRIES) -> str:
    """The Markdown table of the names in ``registries`` (the README's "Registered names" lists
    these and `pipeline.registries.LAUNCHERS`)."""
    rows = ["| config key | name | what it is |", "|---|---|---|"]
    for registry in registries:
        rows += [f"| `{registry.key}` | `{e.name}` | {e.summary} |" for e in registry.entries()]
    return "\n".join(rows)
