"""`dml train --resume` that can be trusted: what it keeps, what it lets change, where it starts.

One real 1-process run (checkpoints at steps 1 and 2) is trained once per module; each test
resumes a copy of it. The 2-process test runs real torchrun workers (gloo).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dml.config import DMLConfig
from dml.errors import DMLError
from dml.train.checkpoint import (
    DIVERGED_SUFFIX,
    NonFiniteState,
    list_checkpoints,
    read_checkpoint,
    step_dir_name,
)
from dml.train.loop import NonFiniteLoss
from dml.train.metrics_log import read_metrics
from dml.train.resume import find_resume_point, fixed_changes
from dml.train.run import run_train
from local_group import torchrun_dml
from processes import alive, children
from train_fixtures import ROOT, tiny_shards, tiny_train_config, write_config

BASE_LR = 0.01


def config_for(shards: Path, run_dir: Path, **sections) -> dict:
    config = tiny_train_config(
        shards,
        run_dir,
        schedule={"kind": "cosine"},
        train={"epochs": 5, "max_steps": 2, "checkpoint_every": 1, "keep_last": 5},
    )
    for key, value in sections.items():
        config[key] = {**config[key], **value}
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(shards, run folder with step-1 and step-2 checkpoints, its config dict)."""
    root = tmp_path_factory.mktemp("trained")
    shards = tiny_shards(root)
    base = config_for(shards, root / "run")
    run_train(DMLConfig.model_validate(base))
    assert [p.name for p in list_checkpoints(root / "run")] == ["step-00000001", "step-00000002"]
    return shards, root / "run", base


def copy_run(trained, tmp_path: Path, **sections) -> tuple[Path, dict]:
    shards, run, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy, config_for(shards, copy, **sections)


def lr_by_step(run: Path) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in read_metrics(run) if "lr" in r}


def test_lr_and_schedule_changed_at_resume_take_effect(trained, tmp_path):
    run, config = copy_run(
        trained, tmp_path, optimizer={"lr": 0.001}, schedule={"kind": "constant"}, train={"max_steps": 4}
    )
    result = run_train(DMLConfig.model_validate(config), resume=True)
    assert result.steps == 4
    lrs = lr_by_step(run)
    assert lrs[3] == pytest.approx(0.001) and lrs[4] == pytest.approx(0.001)  # not the saved 0.01 cosine
    saved = read_checkpoint(run / "checkpoints" / step_dir_name(4))
    engine = torch.load(run / "checkpoints" / step_dir_name(4) / "optimizer-rank00000.pt", weights_only=True)
    groups = engine["optimizer"]["param_groups"] + [saved["objective"]["head"]["optimizer"]["hyperparameters"]]
    assert all(g["initial_lr"] == pytest.approx(0.001) for g in groups)  # backbone and head both


@pytest.mark.parametrize("kind, warmup", [("cosine", 2), ("poly", 0), ("cyclic", 3)])
def test_logged_lr_is_the_rate_each_step_used(trained, tmp_path, kind, warmup):
    # metrics.jsonl showed the next step's rate: the warm-up's first value never, 0.0 at the end
    from dml.train.schedules import lr_factor

    shards, _, _ = trained
    config = config_for(
        shards,
        tmp_path / "run",
        schedule={"kind": kind, "warmup_steps": warmup, "cycle_steps": 2},
        train={"max_steps": 5, "checkpoint_every": 5},
    )
    validated = DMLConfig.model_validate(config)
    run_train(validated)
    lrs = lr_by_step(tmp_path / "run")
    assert sorted(lrs) == [1, 2, 3, 4, 5]
    for step, lr in lrs.items():
        assert lr == pytest.approx(BASE_LR * lr_factor(step - 1, 5, validated.schedule)), step


def as_written_before_the_optimizers_container(checkpoint: Path) -> None:
    """Rewrite ``checkpoint`` in the earlier layout: the DDP engine state (with the window
    position) inside state.pt, and ``base_lr`` where LambdaLR keeps ``initial_lr``."""
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    engine = torch.load(checkpoint / "optimizer-rank00000.pt", weights_only=True)
    head_groups = [state["objective"]["head"]["optimizer"]["hyperparameters"]]
    for group in engine["optimizer"]["param_groups"] + head_groups:
        group["base_lr"] = group.pop("initial_lr")
    state["engine"] = {**engine, "micro_step": state.pop("optimizers")["micro_step"]}
    (checkpoint / "optimizer-rank00000.pt").unlink()
    torch.save(state, checkpoint / "state.pt")


def test_a_checkpoint_of_the_earlier_layout_resumes_as_the_current_one(trained, tmp_path):
    """Same weights after resuming either layout (so the old optimizer state was loaded), and
    the changed lr takes effect."""
    weights = []
    for layout in ("current", "earlier"):
        run, config = copy_run(
            trained, tmp_path / layout, optimizer={"lr": 0.001}, schedule={"kind": "constant"}, train={"max_steps": 3}
        )
        if layout == "earlier":
            as_written_before_the_optimizers_container(run / "checkpoints" / step_dir_name(2))
        assert run_train(DMLConfig.model_validate(config), resume=True).steps == 3
        assert lr_by_step(run)[3] == pytest.approx(0.001)
        weights.append(read_checkpoint(run / "checkpoints" / step_dir_name(3))["model"])
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


@pytest.mark.parametrize(
    "key, value, refused",
    [
        ("model.embedding_dim", 32, True),
        ("model.backbone", "resnet18", True),
        ("loss.kind", "cosface", True),
        ("loss.margin", 0.4, True),
        ("data.batch_size", 4, True),
        ("data.image_size", 40, True),
        ("seed", 3, True),
        ("optimizer.name", "adamw", True),
        ("optimizer.momentum", 0.0, True),
        ("train.grad_accum", 2, True),
        ("swa.enabled", True, True),
        ("optimizer.lr", 0.5, False),
        ("optimizer.weight_decay", 0.0, False),
        ("optimizer.grad_clip", None, False),
        ("loss.head_lr", 0.1, False),
        ("schedule.kind", "poly", False),
        ("schedule.warmup_steps", 3, False),
        ("train.max_steps", 9, False),
        ("train.epochs", 9, False),
        ("train.log_every", 7, False),
        ("train.checkpoint_every", 7, False),
        ("train.run_dir", "elsewhere", False),
        ("data.shard_dir", "moved", False),
        ("data.num_workers", 2, False),
        ("evaluate.output_dir", "x", False),
        ("export.opset", 18, False),
    ],
)
def test_which_keys_a_resume_may_change(tmp_path, key, value, refused):
    base = config_for(tmp_path / "shards", tmp_path / "run")
    changed = {**base}
    section, _, name = key.rpartition(".")
    if section:
        changed[section] = {**changed.get(section, {}), name: value}
    else:
        changed[name] = value
    saved = DMLConfig.model_validate(base).model_dump(mode="json")
    found = fixed_changes(saved, DMLConfig.model_validate(changed))
    assert bool(found) == refused and (not refused or found[0].startswith(key))


def test_a_changed_model_key_is_refused_in_one_line(trained, tmp_path):
    run, config = copy_run(trained, tmp_path, model={"embedding_dim": 32})
    saved_config = (run / "config.yaml").read_text()
    with pytest.raises(DMLError) as caught:
        run_train(DMLConfig.model_validate(config), resume=True)
    assert "model.embedding_dim (16 -> 32)" in str(caught.value) and "\n" not in str(caught.value)
    assert (run / "config.yaml").read_text() == saved_config  # the run's record is untouched


def test_other_data_is_refused_unless_asked_for(trained, tmp_path):
    other = tiny_shards(tmp_path / "other", classes=5)
    _run, config = copy_run(trained, tmp_path, data={"shard_dir": str(other)}, train={"max_steps": 3})
    with pytest.raises(DMLError, match=r"manifest.json is not the data .* \(6 classes then, 5 now\).*--allow-new-data"):
        run_train(DMLConfig.model_validate(config), resume=True)
    same_count = tiny_shards(tmp_path / "same", classes=6, per_class=10)
    config["data"]["shard_dir"] = str(same_count)
    with pytest.raises(DMLError, match="6 classes then, 6 now"):
        run_train(DMLConfig.model_validate(config), resume=True)


def test_allow_new_data_fine_tunes_with_a_fresh_head_when_classes_differ(trained, tmp_path, caplog):
    other = tiny_shards(tmp_path / "other", classes=5)
    run, config = copy_run(trained, tmp_path, data={"shard_dir": str(other)}, train={"max_steps": 3})
    with caplog.at_level(logging.WARNING):
        result = run_train(DMLConfig.model_validate(config), resume=True, allow_new_data=True)
    assert result.steps == 3
    assert "the head's class centres are re-initialised" in caplog.text
    saved = read_checkpoint(run / "checkpoints" / step_dir_name(3))
    assert saved["objective"]["head"]["num_classes"] == 5 and saved["data_identity"]["num_classes"] == 5


@pytest.mark.parametrize("damage", ["truncated", "empty", "random", "nan weights", "foreign"])
def test_a_damaged_newest_checkpoint_falls_back_with_a_warning(trained, tmp_path, caplog, damage):
    run, _ = copy_run(trained, tmp_path)
    state = run / "checkpoints" / "step-00000002" / "state.pt"
    good = state.read_bytes()
    if damage == "nan weights":
        payload = torch.load(state, weights_only=True)
        next(iter(payload["model"].values())).fill_(float("nan"))
        torch.save(payload, state)
    elif damage == "foreign":
        torch.save({"something": torch.ones(2)}, state)
    else:
        state.write_bytes({"truncated": good[: len(good) // 2], "empty": b"", "random": os.urandom(2048)}[damage])
    with caplog.at_level(logging.WARNING):
        point = find_resume_point(run, resume=True)
    assert point.path.name == "step-00000001" and point.state["train_state"]["step"] == 1
    assert "skipping step-00000002" in caplog.text
    # Set aside, so keep_last pruning can never delete the good one and keep the damaged one.
    assert [p.name for p in list_checkpoints(run)] == ["step-00000001"]
    assert (run / "checkpoints" / "step-00000002.unreadable" / "state.pt").is_file()


def test_a_truncated_state_resumes_from_the_one_before(trained, tmp_path):
    run, config = copy_run(trained, tmp_path, train={"max_steps": 3})
    state = run / "checkpoints" / "step-00000002" / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    result = run_train(DMLConfig.model_validate(config), resume=True)
    assert result.steps == 3
    assert [r["step"] for r in read_metrics(run) if "loss_main" in r][-2:] == [2, 3]  # step 2 redone


@pytest.mark.parametrize("max_steps", [2, 4])
def test_steps_logged_after_the_checkpoint_resumed_from_appear_once(trained, tmp_path, max_steps):
    # a run stopped after logging step 2 but resumed from the step-1 checkpoint logged step 2 twice
    run, config = copy_run(trained, tmp_path, train={"max_steps": max_steps})
    shutil.rmtree(run / "checkpoints" / "step-00000002")
    logged_before = [r for r in read_metrics(run) if r.get("step", 0) > 1]
    assert logged_before  # the killed run's step-2 records
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 2, "loss_ma')  # and a line torn by the kill
    run_train(DMLConfig.model_validate(config), resume=True)
    steps = [r["step"] for r in read_metrics(run) if "loss_main" in r]
    assert steps == list(range(1, max_steps + 1))
    replayed = (run / "metrics.replayed.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in replayed[:-1]] == logged_before and replayed[-1] == '{"step": 2, "loss_ma'


def test_a_run_folder_in_use_is_refused_until_its_holder_ends(trained, tmp_path):
    # a resume started while a killed launcher's workers still trained: both wrote one
    # metrics.jsonl and rotated away each other's checkpoints
    import fcntl

    run, config = copy_run(trained, tmp_path, train={"max_steps": 3})
    holder = subprocess.Popen(  # another process holding the run lock, as a live dml train does
        [sys.executable, "-c", HOLD_LOCK, str(run / ".run.lock")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(DMLError, match=r"is in use by another `dml train` \(pid \d+"):
            run_train(DMLConfig.model_validate(config), resume=True)
        assert len(list_checkpoints(run)) == 2 and not any(r.get("step") == 3 for r in read_metrics(run))
    finally:
        holder.kill()
        holder.wait()
    assert run_train(DMLConfig.model_validate(config), resume=True).steps == 3  # the kernel dropped the lock
    with open(run / ".run.lock") as handle:  # and this run released it
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)


HOLD_LOCK = """
import fcntl, os, sys, time
handle = open(sys.argv[1], "a+")
fcntl.flock(handle, fcntl.LOCK_EX)
handle.write(f"{os.getpid()}\\n"); handle.flush()
print("locked", flush=True)
time.sleep(600)
"""


def test_no_resumable_checkpoint_is_one_line(trained, tmp_path):
    run, config = copy_run(trained, tmp_path)
    for checkpoint in list_checkpoints(run):
        (checkpoint / "state.pt").write_bytes(b"")
    with pytest.raises(DMLError, match=r"no resumable checkpoint in .*step-00000002.*step-00000001"):
        run_train(DMLConfig.model_validate(config), resume=True)


def test_resume_of_a_run_that_does_not_exist_is_refused(trained, tmp_path):
    shards, _, _ = trained
    typo = tmp_path / "runz"
    with pytest.raises(DMLError, match=r"no run at .*runz.*drop --resume"):
        run_train(DMLConfig.model_validate(config_for(shards, typo)), resume=True)
    assert not typo.exists()


def test_non_finite_loss_names_the_checkpoint_before_the_one_that_produced_it(trained, tmp_path):
    run, config = copy_run(trained, tmp_path, optimizer={"lr": 1e30, "grad_clip": None}, train={"max_steps": 8})
    with pytest.raises((NonFiniteLoss, NonFiniteState)) as caught:
        run_train(DMLConfig.model_validate(config), resume=True)
    assert f"last good checkpoint: {run / 'checkpoints' / 'step-00000002'}" in str(
        caught.value
    ) or f"previous checkpoint {run / 'checkpoints' / 'step-00000002'} is intact" in str(caught.value)
    for checkpoint in list_checkpoints(run):  # every checkpoint left to resume from is finite and readable
        read_checkpoint(checkpoint)
    assert list_checkpoints(run)[-1].name == "step-00000002"
    config["optimizer"] = {**config["optimizer"], "lr": BASE_LR}
    result = run_train(DMLConfig.model_validate(config), resume=True)  # a lower lr now recovers the run
    assert result.steps == 8


def test_non_finite_from_the_first_step_leaves_nothing_to_resume(trained, tmp_path):
    """The issue's example: lr 1e30 and a checkpoint every step."""
    shards, _, _ = trained
    config = config_for(shards, tmp_path / "run", optimizer={"lr": 1e30})
    with pytest.raises(
        NonFiniteLoss,
        match=r"step-00000001 holds the weights that produced it and was set "
        r"aside .*last good checkpoint: none",
    ):
        run_train(DMLConfig.model_validate(config))
    assert list_checkpoints(tmp_path / "run") == []
    assert (tmp_path / "run" / "checkpoints" / f"step-00000001{DIVERGED_SUFFIX}").is_dir()


def torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = torchrun_dml(nproc, *args)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)


@pytest.mark.dist
def test_two_processes_stop_together_and_resume_from_the_last_good_checkpoint(trained, tmp_path):
    shards, _, _ = trained
    cfg = write_config(tmp_path / "c.yaml", config_for(shards, tmp_path / "run"))
    first = torchrun(["train", "--config", str(cfg)])
    assert first.returncode == 0, first.stdout + first.stderr
    diverge = torchrun(
        [
            "train",
            "--config",
            str(cfg),
            "--resume",
            "optimizer.lr=1e30",
            "optimizer.grad_clip=null",
            "train.max_steps=6",
        ]
    )
    out = diverge.stdout + diverge.stderr
    assert diverge.returncode != 0 and not re.search(r'File ".*/dml/', out), out  # no dml traceback
    good = str(tmp_path / "run" / "checkpoints" / "step-00000002")
    errors = [line for line in out.splitlines() if "dml train: error:" in line]
    assert len(errors) == 2 and all(good in line for line in errors), out  # both ranks, same last good one
    again = torchrun(["train", "--config", str(cfg), "--resume", "train.max_steps=4"])
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resumed from {good} (step 2)" in again.stdout + again.stderr
    # INFO lines come from rank 0 only (each rank logged every stage line)
    assert (again.stdout + again.stderr).count("resumed from") == 1, again.stderr


@pytest.mark.dist
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_end_when_their_launcher_is_killed(trained, tmp_path):
    """SIGKILL to torchrun (an OOM kill, a scheduler) used to leave its workers training as
    orphans; they now end within seconds, and a resume can take the run folder."""
    import signal
    import time

    run, config = copy_run(trained, tmp_path, train={"max_steps": 100_000, "epochs": 100_000, "checkpoint_every": 1})
    cfg = write_config(tmp_path / "c.yaml", config)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(
        torchrun_dml(2, "train", "--config", str(cfg), "--resume"),
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while not any(r.get("step", 0) > 2 for r in read_metrics(run)):  # both workers are training
            assert launcher.poll() is None and time.monotonic() < deadline, "the run did not start"
            time.sleep(0.5)
        workers = [pid for pid in children(launcher.pid) if alive(pid)]
        assert len(workers) == 2
    finally:
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
    deadline = time.monotonic() + 15
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [pid for pid in workers if alive(pid)]
    for pid in left:  # do not leave them running after a failure
        os.kill(pid, signal.SIGKILL)
    assert left == []


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_stopped_training_says_how_to_continue(trained, tmp_path, sig):
    """SIGTERM (a timeout, Kubernetes) ended `dml train` with exit 143 and no word; Ctrl-C
    said only "interrupted". Both now name the checkpoints and --resume, and exit 130."""
    import signal
    import time

    run, config = copy_run(trained, tmp_path, train={"max_steps": 100_000, "epochs": 100_000, "checkpoint_every": 1})
    cfg = write_config(tmp_path / "c.yaml", config)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    child = subprocess.Popen(
        [sys.executable, "-m", "dml.cli", "train", "--config", str(cfg), "--resume"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as from a terminal
    )
    try:
        deadline = time.monotonic() + 240
        while not any(r.get("step", 0) > 3 for r in read_metrics(run)):
            assert child.poll() is None and time.monotonic() < deadline, "the run did not start"
            time.sleep(0.3)
        child.send_signal(getattr(signal, sig))
        _, err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 130, err[-2000:]
    line = next((text for text in err.splitlines() if text.startswith("dml train: interrupted")), err[-2000:])
    assert line.startswith("dml train: interrupted: the checkpoints written so far are in") and "--resume" in line
    assert str(run) in line and "Traceback" not in err
