"""`dml tune` inputs: the search-space file against the config schema, the study settings,
class-disjoint folds and their shard folders, the 95% interval."""

from __future__ import annotations

import itertools
import math

import pytest
import yaml

from dml.cli import main
from dml.config import DMLConfig
from dml.data.manifest import load_manifest
from dml.errors import ConfigError
from dml.tune.final import mean_ci95
from dml.tune.folds import class_folds, training_classes, write_fold_shards
from dml.tune.settings import load_settings
from dml.tune.space import config_keys, load_space, with_values
from tune_fixtures import class_split_shards, write_tune_files


def test_unknown_key_is_one_line_naming_the_closest(tmp_path, capsys):
    class_split_shards(tmp_path)
    run, space = write_tune_files(tmp_path, {"loss.scael": {"low": 8, "high": 64}})
    assert main(["tune", "--config", str(run), "--space", str(space)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert str(space) in err and "unknown config key 'loss.scael'; did you mean 'loss.scale'?" in err
    assert not (tmp_path / "study").exists()  # refused before anything was written


@pytest.mark.parametrize(
    "spec, problem",
    [
        ({"loss.scale": {"low": 0, "high": 8}}, "makes an invalid config"),  # scale must be > 0
        ({"loss.kind": {"choices": ["arcface", "arcfase"]}}, "makes an invalid config"),
        ({"loss.margin": {"low": 0.5, "high": 0.1}}, "must be below high"),
        ({"optimizer.lr": {"low": 0.1, "high": 1, "log": True, "step": 0.1}}, "log range"),
        ({"train.epochs": {"low": 1, "high": 2.5}}, "whole numbers"),
        ({"loss.margin": {"lo": 0.1, "high": 0.5}}, "unknown field 'lo'"),
        ({"study": {"n_trails": 3}, "loss.margin": [0.1, 0.2]}, "did you mean 'n_trials'"),
    ],
)
def test_bad_space_refused(tmp_path, spec, problem):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=problem):
        load_settings(load_space(path).study, str(path))


@pytest.mark.parametrize(
    "spec",
    [
        {"loss.margin": {"choices": [0.2, -5]}},
        {"loss.margin": [0.2, 5.0]},
        {"loss.margin": {"low": 0.1, "high": 4.0}},
        {"loss.kind": ["arcface", "sphereface"]},  # sphereface needs loss.margin >= 1, the base has 0.3
        {"evaluate.ks": {"choices": [[1, 5], [0]]}},
    ],
)
def test_a_choice_the_run_would_refuse_is_refused_at_load_in_one_line(tmp_path, capsys, spec):
    class_split_shards(tmp_path)
    run, space = write_tune_files(tmp_path, spec)
    assert main(["tune", "--config", str(run), "--space", str(space)]) == 2
    err = capsys.readouterr().err.strip()
    key = next(iter(spec))
    assert len(err.splitlines()) == 1 and f"'{key}'" in err and "makes an invalid config" in err, err
    assert not (tmp_path / "study").exists()


def test_a_failed_trial_reports_its_reason(tmp_path):
    """Optuna keeps no reason on a failed trial: the runner records the fold's, and the study's
    error shows it (it said 'trial 0: ?')."""
    import optuna

    from dml.errors import DMLError
    from dml.tune.launch import TrainFailed
    from dml.tune.settings import StudySettings
    from dml.tune.study import run_trials
    from dml.tune.trial import TrialRunner

    def failing_fold(config_path, run_dir, nproc_per_node):
        raise TrainFailed(f"{run_dir}: exit code 1: RuntimeError: out of memory")

    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"loss.scale": {"low": 8, "high": 64}}))
    runner = TrialRunner({}, load_space(path), [tmp_path / "fold"], tmp_path / "study", train_fold=failing_fold)
    study = optuna.create_study(direction="maximize")
    settings = StudySettings(study_dir=str(tmp_path / "study"), n_trials=2, max_failed_trials=2)
    with pytest.raises(DMLError, match=r"trial 1: .*fold-0: exit code 1: RuntimeError: out of memory"):
        run_trials(study, runner, settings)
    assert all("out of memory" in t.user_attrs["fail_reason"] for t in study.trials)


def test_every_schema_key_is_accepted_and_types_follow_the_schema(tmp_path):
    keys = config_keys()
    assert {"loss.scale", "loss.margin", "optimizer.lr", "train.epochs"} <= set(keys)
    path = tmp_path / "space.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "train.epochs": {"low": 1, "high": 3, "step": 1},
                "loss.scale": {"low": 8, "high": 64},
                "optimizer.name": ["sgd", "adamw"],
            }
        )
    )
    params = {p.key: p for p in load_space(path).params}
    assert params["train.epochs"].is_int and not params["loss.scale"].is_int
    assert params["train.epochs"].grid_values() == [1, 2, 3]
    assert params["optimizer.name"].grid_values() == ["sgd", "adamw"]


def test_values_land_in_the_config():
    data = with_values({"loss": {"kind": "arcface"}}, {"loss.scale": 12.5, "optimizer.lr": 0.01, "seed": 3})
    config = DMLConfig.model_validate(data)
    assert (config.loss.scale, config.optimizer.lr, config.seed, config.loss.kind) == (12.5, 0.01, 3, "arcface")


@pytest.mark.parametrize(
    "n, k, seed", [(n, k, s) for n, k, s in itertools.product([2, 3, 7, 10, 33], [2, 3, 4], [0, 5]) if n >= k]
)
def test_class_folds_partition_the_classes_evenly(n, k, seed):
    """Disjoint, covering, sizes within one, the same for the same seed."""
    classes = [f"c{i}" for i in range(n)]
    folds = class_folds(classes, k, seed)
    assert len(folds) == k and sorted(itertools.chain(*folds)) == sorted(classes)
    assert max(map(len, folds)) - min(map(len, folds)) <= 1
    assert folds == class_folds(classes, k, seed)


def test_fold_shards_hold_training_classes_only(tmp_path):
    """Each fold: the other folds' classes train, its own are the query split; no test class."""
    shards = class_split_shards(tmp_path)
    classes = training_classes(shards)
    test_classes = set(load_manifest(shards)["classes"]) - set(classes)
    folds = class_folds(classes, 2, 0)
    dirs = write_fold_shards(shards, "train", folds, tmp_path / "folds")
    for held_out, fold_dir in zip(folds, dirs, strict=True):
        manifest = load_manifest(fold_dir)
        names = manifest["classes"]
        query, train = (
            {names[int(i)] for i in manifest["splits"][split]["class_counts"]} for split in ("query", "train")
        )
        assert set(manifest["splits"]) == {"train", "query"}
        assert query == set(held_out) and train == set(classes) - set(held_out)
        assert not (train | query) & test_classes
        assert manifest["counts"]["written"] == 8 * len(classes)
    assert write_fold_shards(shards, "train", folds, tmp_path / "folds") == dirs  # kept, not rewritten


def test_one_seed_has_no_interval_rather_than_a_zero_one():
    from dml.tune.final import mean_and_interval

    one = mean_ci95([0.4533])
    assert one["ci95"] is None and one["low"] is None and one["mean"] == 0.4533
    assert mean_and_interval(one) == "0.4533 (1 seed, no interval)"
    assert mean_and_interval(mean_ci95([0.4, 0.5])).startswith("0.4500 ± ")


def test_mean_ci95_is_the_student_t_interval():
    summary = mean_ci95([1.0, 2.0, 3.0])
    assert summary["mean"] == 2.0
    assert math.isclose(summary["ci95"], 4.302652729911275 / math.sqrt(3), rel_tol=1e-9)


def test_space_survives_the_study_storage(tmp_path):
    """A resumed study compares the stored space with the file's: choices and ranges alike."""
    import json

    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"loss.margin": [0.1, 0.3], "loss.scale": {"low": 8, "high": 64, "log": True}}))
    space = load_space(path)
    assert json.loads(json.dumps(space.as_dict())) == space.as_dict()


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_a_resumed_study_does_not_replay_earlier_draws(tmp_path, sampler):
    """Re-attaching to a study that holds trials (a resume, another worker) seeds the sampler
    past them: the first new draw is not the first run's first draw again."""
    from dml.tune.study import attach_study

    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"loss.scale": {"low": 8, "high": 64, "log": True}}))
    space = load_space(path)
    settings = load_settings({"study_dir": str(tmp_path / "study"), "sampler": sampler}, "space.yaml")
    first = attach_study(settings, space)
    first.optimize(lambda trial: trial.suggest_float("loss.scale", 8, 64, log=True), n_trials=3)
    drawn = [t.params["loss.scale"] for t in first.trials]
    again = attach_study(settings, space)
    again.optimize(lambda trial: trial.suggest_float("loss.scale", 8, 64, log=True), n_trials=2)
    new = [t.params["loss.scale"] for t in again.trials[3:]]
    assert len(new) == 2 and not set(new) & set(drawn)


def test_a_refused_fold_count_leaves_no_study(tmp_path, capsys):
    """Inputs are checked before the study is created, so the corrected command runs as new."""
    class_split_shards(tmp_path, classes=4)
    run_path, space_path = write_tune_files(tmp_path, {"loss.scale": {"low": 8, "high": 64}}, folds=50, n_trials=1)
    assert main(["tune", "--config", str(run_path), "--space", str(space_path)]) == 2
    assert "cannot make 50 class-disjoint folds" in capsys.readouterr().err
    assert not list((tmp_path / "study").glob("*.db"))


@pytest.mark.parametrize("sampler_seed", [0, 7, None])
@pytest.mark.parametrize("grid_shape", [(2,), (3, 2), (5,)])
def test_grid_trials_from_processes_joining_at_any_count_cover_the_grid_once(tmp_path, sampler_seed, grid_shape):
    """Each process of a study (a `dml pipeline tune` trial task, a second `dml tune --resume`)
    attaches with its own count of trials so far; the grid points its trials evaluate must
    still be the grid, each once (a per-process shuffle seed gave [0.3, 0.3] for [0.1, 0.3])."""
    from dml.tune.study import attach_study, open_study

    keys = ["loss.margin", "loss.scale"][: len(grid_shape)]
    values = {
        key: [round(0.1 * (i + 1), 1) if key == "loss.margin" else 8 * (i + 1) for i in range(n)]
        for key, n in zip(keys, grid_shape, strict=True)
    }
    path = tmp_path / "space.yaml"
    study_section = {"study_dir": str(tmp_path / "study"), "sampler": "grid", "sampler_seed": sampler_seed}
    path.write_text(yaml.safe_dump({**values, "study": study_section}))
    space = load_space(path)
    settings = load_settings(space.study, str(path))
    open_study(settings, space, resume=False)
    seen = []
    for _ in range(math.prod(grid_shape)):  # each trial asked by a freshly attached process
        study = attach_study(settings, space)
        study.optimize(lambda trial: seen.append(tuple(space.suggest(trial)[k] for k in keys)) or 0.0, n_trials=1)
    assert sorted(seen) == sorted(itertools.product(*(values[k] for k in keys)))


@pytest.mark.parametrize("points, killed", [(2, 1), (3, 1), (4, 2), (3, 3)])
def test_grid_study_resumed_after_a_kill_evaluates_every_point_once(tmp_path, points, killed):
    """Trials a kill left running are retried with their values; on a grid study the retry
    raised KeyError('grid_id') in optuna's grid sampler when it was the last point left."""
    from optuna.trial import TrialState

    from dml.tune.study import open_study, run_trials

    path = tmp_path / "space.yaml"
    values = [round(0.1 * (i + 1), 1) for i in range(points)]
    path.write_text(
        yaml.safe_dump({"loss.margin": values, "study": {"study_dir": str(tmp_path / "s"), "sampler": "grid"}})
    )
    space = load_space(path)
    settings = load_settings(space.study, str(path))
    study = open_study(settings, space, resume=False)
    for _ in range(killed):  # asked and never told: what a SIGKILL leaves behind
        space.suggest(study.ask())
    study = open_study(settings, space, resume=True)
    run_trials(study, lambda trial: space.suggest(trial)["loss.margin"], settings)
    done = [t.params["loss.margin"] for t in study.get_trials(states=(TrialState.COMPLETE,))]
    assert sorted(done) == values


def test_grid_over_a_range_without_step_is_refused_before_anything_is_written(tmp_path, capsys):
    class_split_shards(tmp_path)
    run, space = write_tune_files(tmp_path, {"loss.margin": {"low": 0.1, "high": 0.5}}, sampler="grid")
    assert main(["tune", "--config", str(run), "--space", str(space)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(space) in err and "needs 'choices' or a 'step'" in err
    assert not (tmp_path / "study").exists()  # no fold shards, no study database


@pytest.mark.parametrize("parallel", [1, 2, 3])
@pytest.mark.parametrize(
    "grid_shape, n_trials, killed",
    [((2, 2), 6, 0), ((2, 2), 4, 2), ((2, 2), 3, 1), ((3,), 5, 1), ((3, 2), 7, 0), ((5,), 2, 0)],
)
def test_grid_study_runs_each_point_at_most_once_and_never_more_trials_than_points(
    tmp_path, caplog, grid_shape, n_trials, killed, parallel
):
    """A 2x2 grid with n_trials 6 and parallel 2 ran 5 trials, the 5th repeating a point still
    running. n_trials is cut to the grid size (one INFO line) and parallel trials share no point,
    also when a resume's retries push trial numbers past the grid size."""
    import threading
    import time

    from dml.tune.study import fit_trials_to_grid, open_study, run_trials

    keys = ["loss.margin", "loss.scale"][: len(grid_shape)]
    values = {
        key: [round(0.1 * (i + 1), 1) if key == "loss.margin" else 8 * (i + 1) for i in range(n)]
        for key, n in zip(keys, grid_shape, strict=True)
    }
    path = tmp_path / "space.yaml"
    study_section = {"study_dir": str(tmp_path / "s"), "sampler": "grid", "n_trials": n_trials, "parallel": parallel}
    path.write_text(yaml.safe_dump({**values, "study": study_section}))
    space = load_space(path)
    size = math.prod(grid_shape)
    with caplog.at_level("INFO", logger="dml.tune.study"):
        settings = fit_trials_to_grid(load_settings(space.study, str(path)), space)
    cut_lines = [r for r in caplog.records if "cut to" in r.getMessage()]
    assert settings.n_trials == min(n_trials, size) and len(cut_lines) == (n_trials > size)
    seen, lock = [], threading.Lock()

    def objective(trial):
        point = tuple(space.suggest(trial)[k] for k in keys)
        with lock:
            seen.append(point)
        time.sleep(0.05)  # let parallel trials overlap, as real trainings do
        return 0.0

    study = open_study(settings, space, resume=False)
    for _ in range(killed):  # asked and never told: what a SIGKILL leaves behind
        space.suggest(study.ask())
    run_trials(open_study(settings, space, resume=True) if killed else study, objective, settings)
    assert len(seen) == min(n_trials, size) and len(set(seen)) == len(seen), seen
    assert set(seen) <= set(itertools.product(*(values[k] for k in keys)))


def test_tune_start_line_gives_the_grid_cut_trial_count(tmp_path):
    """The plan `dml tune` starts from holds the cut n_trials (its start line said 6 trials for 4 points)."""
    from dml.tune.run import load_plan

    class_split_shards(tmp_path)
    run, space = write_tune_files(
        tmp_path, {"loss.margin": [0.1, 0.2], "loss.scale": [8, 16]}, sampler="grid", n_trials=6, parallel=2
    )
    assert load_plan(run, space).settings.n_trials == 4
