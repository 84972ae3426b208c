"""Config of face verification sets (`train.verification_sets`, `evaluate.verification_sets`)
and the check of `train.best_metric` against the metrics those sets log."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class VerificationSetConfig(BaseModel):
    """A face verification set: an insightface ``.bin`` (``path`` only), or an LFW-style pairs
    file (``path``) read against a folder of ``<identity>/<file ending in image number>``
    images (``folder``). A plain string in a config is taken as ``path``. ``name`` (default:
    the .bin's stem, or the folder's name) is how its metrics are named: ``ver_<name>_accuracy``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    path: str
    folder: str | None = None
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _bin_or_pairs(self) -> VerificationSetConfig:
        if self.folder is None and not self.path.endswith(".bin"):
            raise ValueError(
                f"verification set {self.path}: a pairs file needs 'folder' (the images it names); "
                "an insightface set is a .bin file"
            )
        return self

    @property
    def set_name(self) -> str:
        """``name``, else the file's stem (or the folder's name): it names the set's metrics."""
        return self.name or (Path(self.path).stem if self.folder is None else Path(self.folder).name)


VERIFICATION_METRICS = ("accuracy", "accuracy_std", "best_threshold_accuracy", "roc_auc", "eer")


def check_verification_sets(sets: list[VerificationSetConfig]) -> None:
    """Set names must be unique (they name the metrics). Raises ValueError for a repeated name."""
    names = [s.set_name for s in sets]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"verification sets share the name(s) {', '.join(repeated)}: give each a 'name'")


def check_best_metric(metric: str | None, sets: list[VerificationSetConfig]) -> None:
    """``metric`` must be None, an ``eval_*`` retrieval metric, or ``ver_<set>_<metric>`` of a
    configured set; raises ValueError naming the choices."""
    if metric is None or metric.startswith("eval_"):
        return
    names = [s.set_name for s in sets]
    for name in names:
        rest = metric.removeprefix(f"ver_{name}_")
        if rest != metric and (rest in VERIFICATION_METRICS or rest.startswith(("tar_at_far_", "val_at_far_"))):
            return
    raise ValueError(
        f"train.best_metric '{metric}' is not a logged metric: use eval_<retrieval metric> or "
        f"ver_<set>_<{'|'.join(VERIFICATION_METRICS)}|tar_at_far_1e-03|val_at_far_1e-03> with a set "
        f"of train.verification_sets ({', '.join(names) or 'none configured'})"
    )
