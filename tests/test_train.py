"""`dml train`: single process, resume (also on another world size), faults, accumulation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dml.config import DMLConfig
from dml.train.checkpoint import list_checkpoints
from dml.train.metrics_log import read_metrics
from dml.train.run import run_train
from dml.train.schedules import lr_factor
from local_group import torchrun_dml
from train_fixtures import ROOT, tiny_shards, tiny_train_config, write_config


def torchrun(args: list[str], nproc: int, max_restarts: int = 0, **popen) -> subprocess.Popen:
    cmd = torchrun_dml(nproc, *args, max_restarts=max_restarts)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen
    )


def train_alone(config_path: Path) -> subprocess.CompletedProcess:
    """`python -m dml.cli train` as a plain process (no torchrun variables), output captured."""
    launch = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launch}
    return subprocess.run(
        [sys.executable, "-m", "dml.cli", "train", "--config", str(config_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_single_process_run_writes_everything(tmp_path):
    shards = tiny_shards(tmp_path)
    config = DMLConfig.model_validate(tiny_train_config(shards, tmp_path / "run", train={"epochs": 2}))
    result = run_train(config)
    run = tmp_path / "run"
    assert (run / "config.yaml").exists() and (run / "model.pt").exists()
    records = [r for r in read_metrics(run) if "loss_main" in r]
    assert [r["step"] for r in records] == list(range(1, result.steps + 1))
    assert all(r["images_per_s"] > 0 and r["max_rss_mb"] > 0 for r in records)
    assert len(list_checkpoints(run)) == 2  # keep_last
    assert 0.0 <= result.metrics["eval_map_at_r"] <= 1.0
    with pytest.raises(Exception, match="already holds checkpoints"):
        run_train(config)


def test_killed_run_resumes_where_it_stopped(tmp_path):
    shards = tiny_shards(tmp_path, per_class=24)
    base = tiny_train_config(shards, tmp_path / "run", train={"epochs": 2, "checkpoint_every": 3})
    cfg = write_config(tmp_path / "c.yaml", base)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    victim = subprocess.Popen(
        [sys.executable, "-m", "dml.cli", "train", "--config", str(cfg)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 180
    while time.time() < deadline and not list_checkpoints(tmp_path / "run"):
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    saved_step = torch.load(list_checkpoints(tmp_path / "run")[-1] / "state.pt", weights_only=False)["train_state"][
        "step"
    ]
    result = run_train(DMLConfig.model_validate(base), resume=True)
    records = [r for r in read_metrics(tmp_path / "run") if "loss_main" in r]
    resumed = [r for r in records if r["time"] >= records[-1]["time"] - 1e9][-(result.steps - saved_step) :]
    assert [r["step"] for r in resumed] == list(range(saved_step + 1, result.steps + 1))
    # The schedule continued: the lr each resumed step used (0-based optimizer step) is the uninterrupted run's.
    config = DMLConfig.model_validate(base)
    for r in resumed:
        assert r["lr"] == pytest.approx(0.01 * lr_factor(r["step"] - 1, result.steps, config.schedule))


def test_gradient_accumulation_steps_schedule_per_optimizer_step(tmp_path):
    shards = tiny_shards(tmp_path)
    config = DMLConfig.model_validate(
        tiny_train_config(
            shards,
            tmp_path / "run",
            train={"grad_accum": 2, "epochs": 2},
            schedule={"kind": "cosine", "warmup_steps": 2},
        )
    )
    result = run_train(config)
    batches = json.loads((shards / "manifest.json").read_text())["splits"]["train"]["count"] // 6
    assert result.steps == 2 * (batches // 2)
    records = [r for r in read_metrics(tmp_path / "run") if "lr" in r]
    for r in records:  # the lr step s used: the factor of 0-based optimizer step s - 1
        assert r["lr"] == pytest.approx(0.01 * lr_factor(r["step"] - 1, result.steps, config.schedule))


def test_pair_loss_with_pk_batches(tmp_path):
    shards = tiny_shards(tmp_path)
    config = DMLConfig.model_validate(
        tiny_train_config(
            shards,
            tmp_path / "run",
            loss={"kind": "multisimilarity"},
            data={"pk_classes": 3, "pk_samples": 2},
            train={"epochs": 2},
        )
    )
    result = run_train(config)
    assert result.steps > 0 and torch.load(tmp_path / "run" / "model.pt", weights_only=False)["model"]


@pytest.mark.dist
def test_two_processes_then_resume_on_one(tmp_path):
    shards = tiny_shards(tmp_path)
    base = tiny_train_config(shards, tmp_path / "run", train={"epochs": 4, "max_steps": 3})
    cfg = write_config(tmp_path / "c.yaml", base)
    proc = torchrun(["train", "--config", str(cfg)], nproc=2)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    saved = torch.load(list_checkpoints(tmp_path / "run")[-1] / "state.pt", weights_only=False)
    assert saved["world_size"] == 2 and saved["train_state"]["step"] == 3
    more = DMLConfig.model_validate({**base, "train": {**base["train"], "max_steps": 5}})
    result = run_train(more, resume=True)
    assert result.steps == 5


@pytest.mark.dist
@pytest.mark.restart
@pytest.mark.timeout(420)
def test_killed_worker_restarts_from_checkpoint(tmp_path):
    """Under `torchrun --max-restarts 1`, SIGKILL one worker: the restarted workers resume.

    It used to fail or hang about half the time on a loaded machine: torchrun keeps its store
    across restarts, so a restarted rank could read its peer's gloo address from the killed
    attempt. `init_distributed` now prefixes the store per attempt (8 of 8 passed under load).
    """
    shards = tiny_shards(tmp_path, per_class=24)
    base = tiny_train_config(shards, tmp_path / "run", train={"epochs": 20, "max_steps": 14, "checkpoint_every": 3})
    cfg = write_config(tmp_path / "c.yaml", base)
    proc = torchrun(["train", "--config", str(cfg)], nproc=2, max_restarts=1)
    deadline = time.time() + 240
    while time.time() < deadline and not list_checkpoints(tmp_path / "run"):
        time.sleep(0.2)
    assert list_checkpoints(tmp_path / "run"), "no checkpoint before the kill"
    workers = subprocess.run(["pgrep", "-f", f"dml.cli train --config {cfg}"], capture_output=True, text=True)
    pids = [int(p) for p in workers.stdout.split() if int(p) != proc.pid]
    assert pids, "no worker processes found"
    os.kill(max(pids), signal.SIGKILL)
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out
    result = json.loads((tmp_path / "run" / "train_result.json").read_text())
    assert result["steps"] == 14
    steps = [r["step"] for r in read_metrics(tmp_path / "run") if "loss_main" in r]
    assert (steps[-1] == 14 and len(steps) > len(set(steps))) or steps == sorted(steps)
    assert "resumed from" in out


@pytest.mark.dist
@pytest.mark.slow
def test_deepspeed_backend_trains_and_resumes(tmp_path):
    """DeepSpeed ZeRO-2 on 2 CPU processes (gloo); the first use JIT-builds one DeepSpeed op."""
    shards = tiny_shards(tmp_path)
    base = tiny_train_config(
        shards, tmp_path / "run", train={"backend": "deepspeed", "epochs": 3, "max_steps": 3, "checkpoint_every": 3}
    )
    cfg = write_config(tmp_path / "c.yaml", base)
    out, _ = torchrun(["train", "--config", str(cfg)], nproc=2).communicate(timeout=900)
    checkpoint = list_checkpoints(tmp_path / "run")[-1]
    assert sorted(p.name for p in checkpoint.glob("optimizer-rank*.pt")) == [
        "optimizer-rank00000.pt",
        "optimizer-rank00001.pt",
    ], out
    more = write_config(tmp_path / "c2.yaml", {**base, "train": {**base["train"], "max_steps": 5}})
    proc = torchrun(["train", "--config", str(more), "--resume"], nproc=2)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out
    assert "resumed from" in out and json.loads((tmp_path / "run" / "train_result.json").read_text())["steps"] == 5


@pytest.mark.slow
def test_deepspeed_backend_runs_as_a_plain_single_process(tmp_path):
    """`dml train` without torchrun (which the README allows for one process): DeepSpeed used
    to look for MPI (`ModuleNotFoundError: mpi4py`); it now runs as a group of one."""
    shards = tiny_shards(tmp_path)
    cfg = write_config(
        tmp_path / "c.yaml",
        tiny_train_config(
            shards, tmp_path / "run", train={"backend": "deepspeed", "epochs": 1, "max_steps": 2, "checkpoint_every": 2}
        ),
    )
    proc = train_alone(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "train_result.json").read_text())["steps"] == 2


@pytest.mark.slow
@pytest.mark.parametrize(
    "zero, key",
    [({"stage": 7}, "DeepSpeedZeroConfig.stage"), ({"stage": 2, "reduce_bucket_size": "big"}, "reduce_bucket_size")],
)
def test_deepspeed_json_with_values_deepspeed_refuses_is_one_line(tmp_path, zero, key):
    """Values DeepSpeed's own (pydantic) checks refuse were a multi-line dump with help URLs."""
    shards = tiny_shards(tmp_path)
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimization": zero}))
    train = {"backend": "deepspeed", "epochs": 1, "max_steps": 1, "deepspeed_config": str(ds_json)}
    cfg = write_config(tmp_path / "c.yaml", tiny_train_config(shards, tmp_path / "run", train=train))
    proc = train_alone(cfg)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert f"DeepSpeed refuses {ds_json}" in errors[0] and key in errors[0], errors[0]
    assert "Traceback" not in proc.stderr and "errors.pydantic.dev" not in proc.stderr


@pytest.mark.parametrize(
    "content, problem",
    [(None, None), ("{not json", "is not valid JSON"), ("[1]", "JSON object"), ("missing", "file not found")],
)
def test_deepspeed_config_from_any_folder_or_one_line(tmp_path, monkeypatch, content, problem):
    """The default deepspeed_config is found from any working folder; a bad one is one line."""
    from dml.errors import ConfigError
    from dml.train.engine import read_deepspeed_config

    monkeypatch.chdir(tmp_path)  # not the repository root
    if content is None:
        assert read_deepspeed_config("configs/deepspeed/zero2.json")["zero_optimization"]["stage"] == 2
        return
    path = tmp_path / "ds.json"
    if content != "missing":
        path.write_text(content)
    with pytest.raises(ConfigError, match=problem) as caught:
        read_deepspeed_config(str(path))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "text", ['{"steps_per_print": 1, "steps_per_print": 2}', '{"zero_optimization": {"stage": 1, "stage": 2}}']
)
def test_deepspeed_json_key_given_twice_is_refused(tmp_path, text):
    """json.loads kept the last of two equal keys silently (YAML duplicates were refused)."""
    from dml.errors import ConfigError
    from dml.train.engine import read_deepspeed_config

    path = tmp_path / "ds.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"key '(steps_per_print|stage)' is given twice") as caught:
        read_deepspeed_config(str(path))
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_deepspeed_json_folder_is_named_a_folder(tmp_path):
    """A folder was reported as `file not found`."""
    from dml.errors import ConfigError
    from dml.train.engine import read_deepspeed_config

    with pytest.raises(ConfigError, match="is a folder") as caught:
        read_deepspeed_config(str(tmp_path))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("grad_accum", [1, 3])
@pytest.mark.parametrize("batch", [2, 7])
def test_deepspeed_json_keys_dml_overrides_warn_once_each(tmp_path, caplog, batch, grad_accum):
    """Keys dml sets itself: a JSON value that differs is one warning naming the file, the key,
    the JSON's value and the dml key deciding it; an equal value is no warning."""
    from dml.train.deepspeed_json import check_deepspeed_config

    used = {
        "train_micro_batch_size_per_gpu": (batch, "data.batch_size"),
        "train_batch_size": (batch * grad_accum, "data.batch_size x grad_accum x ranks"),
        "gradient_accumulation_steps": (grad_accum, "train.grad_accum"),
        "gradient_clipping": (5.0, "optimizer.grad_clip"),
        "bf16": (False, "train.precision"),
        "fp16": (False, "train.precision"),
    }
    same = {
        "train_micro_batch_size_per_gpu": batch,
        "train_batch_size": batch * grad_accum,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": 5.0,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False, "loss_scale": 0},
    }
    assert check_deepspeed_config(same, "ds.json", used) == []
    other = {
        "train_micro_batch_size_per_gpu": batch + 1,
        "train_batch_size": batch * grad_accum + 1,
        "gradient_accumulation_steps": grad_accum + 1,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": True},
        "fp16": {"enabled": True},
        "optimizer": {"type": "Adam"},
        "scheduler": {"type": "WarmupLR"},
    }
    with caplog.at_level("WARNING"):
        warnings = check_deepspeed_config(other, "ds.json", used)
    assert len(warnings) == len(other) and len(caplog.records) == len(other)
    for key, warning in zip(other, warnings, strict=True):
        assert "ds.json" in warning and f"{key}" in warning, warning
        decider = used[key][1] if key in used else {"optimizer": "optimizer.name", "scheduler": "schedule"}[key]
        assert decider in warning, warning
        if key in used:
            assert json.dumps(other[key]) in warning, warning


def test_deepspeed_json_unknown_key_warns_with_the_closest(tmp_path):
    """A misspelt top-level key was ignored by DeepSpeed without a word; the shipped JSONs warn nothing."""
    from dml.train.deepspeed_json import check_deepspeed_config, read_deepspeed_config

    warnings = check_deepspeed_config({"zero_optimisation": {"stage": 2}, "steps_per_print": 10}, "ds.json", {})
    assert len(warnings) == 1 and "'zero_optimisation'" in warnings[0], warnings
    assert "did you mean 'zero_optimization'" in warnings[0], warnings
    for shipped in sorted((ROOT / "configs" / "deepspeed").glob("*.json")):
        assert check_deepspeed_config(read_deepspeed_config(str(shipped)), str(shipped), {}) == []


@pytest.mark.slow
def test_deepspeed_json_misspelt_key_is_warned_once_by_dml_train(tmp_path):
    """A real plain-process `dml train`: the warning is printed once and the run still succeeds."""
    shards = tiny_shards(tmp_path)
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimisation": {"stage": 2}}))
    train = {"backend": "deepspeed", "epochs": 1, "max_steps": 1, "deepspeed_config": str(ds_json)}
    cfg = write_config(tmp_path / "c.yaml", tiny_train_config(shards, tmp_path / "run", train=train))
    proc = train_alone(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert output.count("did you mean 'zero_optimization'") == 1, output[-3000:]
