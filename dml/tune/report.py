"""What a study leaves beside its database: ``best.yaml`` (the run config with the best values
filled in, which `dml train` and `dml pipeline run` take as they are), ``report.json`` and
the plots of the optimisation history and the parameter importances."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import optuna

from dml.files import write_json_atomic
from dml.tune.final import mean_and_interval
from dml.tune.launch import FAIL_REASON
from dml.tune.space import with_values
from dml.tune.study import FINISHED
from dml.tune.trial import write_run_config

log = logging.getLogger(__name__)


def write_best_config(base: dict[str, Any], params: dict[str, Any], path: Path) -> Path:
    """``base`` with the best ``params`` set, validated, as YAML at ``path``."""
    return write_run_config(with_values(base, params), path)


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One plain row per trial: number, state, value, params, fold scores, folder."""
    return [
        {
            "number": t.number,
            "state": t.state.name,
            "value": t.value,
            "params": t.params,
            "fold_map_at_r": t.user_attrs.get("fold_map_at_r"),
            "trial_dir": t.user_attrs.get("trial_dir"),
            "retry_of": t.user_attrs.get("retry_of"),
            "fail_reason": t.user_attrs.get(FAIL_REASON),
        }
        for t in study.get_trials(deepcopy=False)
    ]


def write_plots(study: optuna.Study, plot_dir: Path) -> dict[str, str]:
    """Optimisation history and parameter importances as PNG files; a plot that cannot be
    drawn (importances need two finished trials that differ) is left out with a log line."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.figure import Figure
    from optuna.visualization import matplotlib as plots

    plot_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, draw in (
        ("optimization_history", plots.plot_optimization_history),
        ("param_importances", plots.plot_param_importances),
    ):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                axes = draw(study)
            path = plot_dir / f"{name}.png"
            figure = axes.figure
            assert isinstance(figure, Figure)  # optuna draws on a figure of its own, not a subfigure
            figure.savefig(path, dpi=100, bbox_inches="tight")
            plt.close(figure)
            written[name] = str(path)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            log.info("tune: no %s plot (%s)", name, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return written


def write_report(study: optuna.Study, path: Path, extra: dict[str, Any]) -> Path:
    """``report.json``: the study, every trial, the best trial and ``extra`` (test results)."""
    finished = [t for t in study.get_trials(deepcopy=False) if t.state in FINISHED]
    best = study.best_trial
    report = {
        "study": study.study_name,
        "direction": "maximize",
        "objective": "mean validation MAP@R over folds",
        "trials_finished": len(finished),
        "best": {
            "number": best.number,
            "value": best.value,
            "params": best.params,
            "fold_map_at_r": best.user_attrs.get("fold_map_at_r"),
        },
        **extra,
        "trials": trial_rows(study),
    }
    write_json_atomic(path, report)
    return path


def summary_lines(report: dict[str, Any]) -> list[str]:
    """Human lines for the CLI: best values, and the test results' means with 95% intervals."""
    best = report["best"]
    lines = [
        f"best trial {best['number']}: validation MAP@R {best['value']:.4f}; "
        + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["params"].items())
    ]
    test = report.get("test")
    if test:
        lines.append(
            f"test ({len(test['per_seed'])} seeds): "
            + ", ".join(
                f"{name} {mean_and_interval(test[name])}" for name in ("map_at_r", "precision_at_1", "r_precision")
            )
        )
    if report.get("concatenated"):
        concat = report["concatenated"]
        lines.append("test, fold models concatenated: " + ", ".join(f"{k} {v:.4f}" for k, v in concat.items()))
    return lines
