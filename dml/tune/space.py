"""The search-space file: dotted config keys with a range or a list of choices.

```yaml
loss.scale: {low: 8, high: 64, log: true}
loss.margin: {low: 0.1, high: 0.6}
optimizer.lr: {low: 0.001, high: 0.1, log: true}
loss.kind: {choices: [arcface, cosface]}
study: {n_trials: 20, folds: 4}        # optional: `dml.tune.settings.StudySettings`
```

Every key is checked against the config schema when the file is loaded: an unknown key is one
`ConfigError` line naming the closest valid one, and both ends of a range (every choice) must
make a valid config.
"""

from __future__ import annotations

import copy
import difflib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from dml.config import DMLConfig, read_config_file, validate_config
from dml.errors import ConfigError

STUDY_KEY = "study"


@dataclass(frozen=True)
class Param:
    """One searched config key: a float/int range (``low``..``high``, ``log`` scale, optional
    ``step``) or a categorical list of ``choices``."""

    key: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] | None = None
    is_int: bool = False  # the schema's field is an integer (train.epochs): suggest_int

    def suggest(self, trial: Any) -> Any:
        """The value for this key drawn by an `optuna.Trial`."""
        if self.choices is not None:
            return trial.suggest_categorical(self.key, list(self.choices))
        assert self.low is not None and self.high is not None  # a range when there are no choices
        if self.is_int:
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, float(self.low), float(self.high), step=self.step, log=self.log)

    def grid_values(self) -> list[Any]:
        """Every value the grid sampler visits: the choices, or the range in ``step``s.

        Raises ConfigError for a range without a ``step``.
        """
        if self.choices is not None:
            return list(self.choices)
        if self.step is None:
            raise ConfigError(f"search space: '{self.key}' needs 'choices' or a 'step' for the grid sampler")
        assert self.low is not None and self.high is not None  # a range when there are no choices
        count = round((self.high - self.low) / self.step) + 1
        values = [self.low + i * self.step for i in range(count)]
        return [int(v) for v in values] if self.is_int else [round(v, 12) for v in values]


@dataclass(frozen=True)
class SearchSpace:
    """The searched keys in file order, and the file's ``study`` section (raw mapping)."""

    params: tuple[Param, ...]
    study: dict[str, Any]
    path: str

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Dotted key -> value for one trial."""
        return {p.key: p.suggest(trial) for p in self.params}

    def grid(self) -> dict[str, list[Any]]:
        """Dotted key -> every value the grid sampler visits."""
        return {p.key: p.grid_values() for p in self.params}

    def as_dict(self) -> dict[str, Any]:
        """The space as JSON-like data (stored with the study to refuse resuming another space)."""
        return {
            p.key: {
                k: list(v) if isinstance(v, tuple) else v
                for k, v in vars(p).items()
                if k != "key" and v not in (None, False)
            }
            for p in self.params
        }


def config_keys(model: type[BaseModel] = DMLConfig, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the config schema (``loss.scale``, ``train.epochs``, ...)."""
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(config_keys(annotation, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def field_annotation(key: str, model: type[BaseModel] = DMLConfig) -> Any:
    """The type annotation of the schema field at dotted ``key`` (which `check_key` accepted)."""
    current: Any = model
    for part in key.split("."):
        current = current.model_fields[part].annotation
    return current


def _is_int_field(key: str) -> bool:
    annotation = field_annotation(key)
    return annotation is int or set(typing.get_args(annotation)) == {int, type(None)}


def _parse_param(key: str, spec: Any, where: str) -> Param:
    if isinstance(spec, list):
        spec = {"choices": spec}
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: '{key}' must be {{low: .., high: ..}} or {{choices: [..]}}, got {spec!r}")
    unknown = sorted(set(spec) - {"low", "high", "log", "step", "choices"})
    if unknown:
        raise ConfigError(f"{where}: '{key}' has unknown field '{unknown[0]}' (use low, high, log, step or choices)")
    if "choices" in spec:
        if set(spec) != {"choices"} or not isinstance(spec["choices"], list) or not spec["choices"]:
            raise ConfigError(f"{where}: '{key}': 'choices' must be a non-empty list, alone")
        return Param(key, choices=tuple(spec["choices"]))
    low, high = spec.get("low"), spec.get("high")
    numbers = (low, high, spec.get("step", 1))
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in numbers):
        raise ConfigError(f"{where}: '{key}' needs numeric 'low' and 'high' (and 'step'), got {spec}")
    assert low is not None and high is not None  # checked just above
    if not low < high:
        raise ConfigError(f"{where}: '{key}': low ({low}) must be below high ({high})")
    if spec.get("log") and (low <= 0 or spec.get("step") is not None):
        raise ConfigError(f"{where}: '{key}': a log range needs low > 0 and no step")
    is_int = _is_int_field(key)
    if is_int and any(isinstance(v, float) and not v.is_integer() for v in numbers):
        raise ConfigError(f"{where}: '{key}' is an integer setting; 'low', 'high' and 'step' must be whole numbers")
    return Param(key, low=low, high=high, log=bool(spec.get("log", False)), step=spec.get("step"), is_int=is_int)


def check_key(key: str, where: str) -> None:
    """A `ConfigError` naming the closest valid key unless ``key`` is a leaf of the schema."""
    valid = config_keys()
    if key in valid:
        return
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"{where}: unknown config key '{key}'{hint}")


def with_values(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of the config mapping ``base`` with each dotted key set to its value."""
    data = copy.deepcopy(base)
    for key, value in values.items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
    return data


def check_values(params: tuple[Param, ...], base: dict[str, Any], where: str) -> None:
    """Both ends of every range and every choice, laid over ``base``, must be a valid config.

    Raises ConfigError naming the key and value that make an invalid config.
    """
    for param in params:
        for value in param.choices if param.choices is not None else (param.low, param.high):
            try:
                validate_config(with_values(base, {param.key: value}), check_backbones=False)
            except ConfigError as exc:
                raise ConfigError(f"{where}: '{param.key}' = {value!r} makes an invalid config: {exc}") from None


def load_space(path: str | Path, base: dict[str, Any] | None = None) -> SearchSpace:
    """Read and check a search-space file; ``base`` is the run config mapping the values are
    checked against. Raises `ConfigError` (one line naming the file) on any problem."""
    path = Path(path)
    data = read_config_file(path)  # one-line errors for a missing file, bad YAML, no mapping
    study = data.pop(STUDY_KEY, None) or {}
    if not isinstance(study, dict):
        raise ConfigError(f"{path}: '{STUDY_KEY}' must be a mapping of study settings")
    if not data:
        raise ConfigError(f"{path}: no config key to search (e.g. 'loss.scale: {{low: 8, high: 64}}')")
    params = []
    for key, spec in data.items():
        check_key(str(key), str(path))
        params.append(_parse_param(str(key), spec, str(path)))
    check_values(tuple(params), base or {}, str(path))
    return SearchSpace(tuple(params), study, str(path))
