"""The DeepSpeed JSON of ``train.deepspeed_config``: read it strictly and say what in it has no effect.

DeepSpeed's own checks accept a key given twice (the last wins), ignore top-level keys it does
not know (a misspelt ``zero_optimisation`` leaves ZeRO off), and dml overrides the batch size,
accumulation, clipping and precision keys from its own config. `read_deepspeed_config` refuses
duplicates; `check_deepspeed_config` warns about the rest.
"""

from __future__ import annotations

import importlib
import json
import logging
import re
import sys
from functools import cache
from pathlib import Path
from typing import Any

from dml.errors import ConfigError
from dml.names import unknown_name

log = logging.getLogger(__name__)
PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the checkout holding configs/ (source or editable install)

# Sections dml drops before DeepSpeed sees them: dml passes its own optimizer (DeepSpeed then ignores
# an `optimizer` section) and steps its own LR schedule (DeepSpeed would build and step a `scheduler`
# section's scheduler on top of it).
DROPPED_SECTIONS = {"optimizer": "optimizer.name", "scheduler": "schedule"}


def _refuse_duplicates(path: Path):
    def object_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                raise ConfigError(f"train.deepspeed_config: {path}: key '{key}' is given twice")
            seen[key] = value
        return seen

    return object_pairs


def read_deepspeed_config(value: str) -> dict[str, Any]:
    """The DeepSpeed JSON named by ``train.deepspeed_config``. A relative path is looked up in
    the working folder, then in the project checkout (the default, ``configs/deepspeed/zero2.json``,
    was only found from the repository root). Raises `ConfigError` (one line naming the file)
    when it is missing, a folder, not JSON, not a JSON object, or gives a key twice."""
    path = Path(value)
    if not path.exists() and not path.is_absolute() and (PROJECT_ROOT / path).exists():
        path = PROJECT_ROOT / path
    if path.is_dir():
        raise ConfigError(f"train.deepspeed_config: {path} is a folder, not a JSON file")
    if not path.is_file():
        raise ConfigError(
            f"train.deepspeed_config: file not found: {value} (looked in {Path.cwd()} and {PROJECT_ROOT})"
        )
    try:
        data = json.loads(path.read_text(), object_pairs_hook=_refuse_duplicates(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"train.deepspeed_config: {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"train.deepspeed_config: {path} must hold a JSON object")
    return data


@cache
def known_deepspeed_keys() -> frozenset[str]:
    """Names DeepSpeed's config modules define (the string values of their upper-case constants).

    DeepSpeed keeps no single list of top-level keys: they are constants spread over
    ``deepspeed.runtime.constants``, ``runtime.zero.config``, the profiler, monitor, compression,
    autotuning... modules. This collects every such constant of the DeepSpeed modules loaded
    with its config parser, so it is a superset (nested keys too): it never flags a key DeepSpeed
    reads, at the cost of missing a typo that happens to equal some nested key.
    """
    for parser in ("deepspeed.runtime.config", "deepspeed.runtime.engine"):  # they load the modules defining keys
        importlib.import_module(parser)

    snake = re.compile(r"[a-z][a-z0-9_]*\Z")
    keys: set[str] = set()
    for name, module in list(sys.modules.items()):
        if not (name == "deepspeed" or name.startswith("deepspeed.")) or module is None:
            continue
        for attr, value in list(vars(module).items()):
            if attr.isupper() and isinstance(value, str) and snake.match(value):
                keys.add(value)
    return frozenset(keys)


def _differs(key: str, given: Any, used: Any) -> bool:
    if key in ("bf16", "fp16"):  # a section: only its `enabled` is dml's
        return isinstance(given, dict) and "enabled" in given and bool(given["enabled"]) != used
    return given != used


def check_deepspeed_config(data: dict[str, Any], path: str, overrides: dict[str, tuple[Any, str]]) -> list[str]:
    """Warn (one log line each, also returned) about what in the DeepSpeed JSON ``data`` read from
    ``path`` has no effect: a key of ``overrides`` (key -> (the value dml uses, the dml config key
    that decides it)) given with another value, an `optimizer` / `scheduler` section (dml drops
    both), and a top-level key DeepSpeed does not know (with the closest known one)."""
    warnings = []
    for key, (used, decider) in overrides.items():
        if key in data and _differs(key, data[key], used):
            warnings.append(
                f"train.deepspeed_config: {path}: {key}={json.dumps(data[key])} is overridden "
                f"by {decider} (dml uses {json.dumps({'enabled': used} if key in ('bf16', 'fp16') else used)})"
            )
    for key, decider in DROPPED_SECTIONS.items():
        if key in data:
            warnings.append(
                f"train.deepspeed_config: {path}: the '{key}' section is ignored: {decider} decides "
                f"(dml passes its own optimizer and LR schedule to DeepSpeed)"
            )
    known = known_deepspeed_keys()
    names = sorted(known)
    for key in data:
        if key not in known and key not in DROPPED_SECTIONS:
            warnings.append(
                f"train.deepspeed_config: {path}: DeepSpeed ignores "
                + unknown_name(key, names, "key", "DeepSpeed's config keys")
            )
    for warning in warnings:
        log.warning("%s", warning)
    return warnings
