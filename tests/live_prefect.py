"""A real Prefect server, workers and `dml pipeline serve` as child processes of a test.

Each process starts in its own session with an environment of its own (its PREFECT_HOME,
the test server's PREFECT_API_URL): nothing is written to ``os.environ``, and the test talks
to the server through `LiveServer.client`, which sets the URL in Prefect's settings context.
`ProcessTree.stop` ends a process and every process below it (flow runs start in sessions of
their own, so killing a process group is not enough), by process id.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from dml.distributed import free_local_port as free_port

PREFECT = str(Path(sys.executable).with_name("prefect"))


def prefect_env(home: Path, **extra: str) -> dict[str, str]:
    """This process's environment without any Prefect API URL, with a PREFECT_HOME of its own."""
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


@dataclass
class ProcessTree:
    """Child processes started by a test, stopped (with their descendants) in reverse order."""

    started: list[tuple[subprocess.Popen, Path]] = field(default_factory=list)

    def start(self, argv: list[str], env: dict[str, str], log: Path, cwd: Path | None = None) -> subprocess.Popen:
        handle = log.open("ab")
        process = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        handle.close()
        self.started.append((process, log))
        return process

    @staticmethod
    def stop(process: subprocess.Popen, grace: float = 20.0) -> None:
        """SIGINT (Prefect's commands shut down on it), then SIGKILL for whatever of the
        process and its descendants is still there after ``grace`` seconds."""
        try:
            tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        for proc in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGINT)
        _, alive = psutil.wait_procs(tree, timeout=grace)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(alive, timeout=10)
        process.poll()

    def stop_all(self) -> None:
        for process, _ in reversed(self.started):
            self.stop(process)

    def tails(self, lines: int = 40) -> str:
        """The last lines of every child's log, for a failure message."""
        parts = []
        for process, log in self.started:
            text = log.read_text(errors="replace").splitlines()[-lines:] if log.exists() else []
            parts.append(f"--- {log} (pid {process.pid}, exit {process.poll()}) ---\n" + "\n".join(text))
        return "\n".join(parts)


@dataclass
class LiveServer:
    """A `prefect server start` on a loopback port with its SQLite database under ``home``."""

    url: str
    home: Path
    env: dict[str, str]  # for the processes a test starts: PREFECT_API_URL = this server

    @contextlib.contextmanager
    def client(self) -> Iterator:
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: self.url}), get_client(sync_client=True) as client:
            yield client


def start_server(processes: ProcessTree, home: Path, timeout: float = 300.0) -> LiveServer:
    """Start the server and wait until its health endpoint answers (a loaded 2-core machine
    needs 30-60 s); an `AssertionError` with its log when it exits or never answers."""
    port = free_port()
    env = prefect_env(home)
    process = processes.start(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, home / "server.log"
    )
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"prefect server exited:\n{processes.tails()}"
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return LiveServer(url, home, {**env, "PREFECT_API_URL": url})
        time.sleep(1)
    raise AssertionError(f"prefect server did not answer in {timeout:.0f} s:\n{processes.tails()}")


def run_cli(argv: list[str], env: dict[str, str], cwd: Path, timeout: float = 180.0) -> subprocess.CompletedProcess:
    """``python -m dml.cli ARGV`` to completion (output captured as text)."""
    return subprocess.run(
        [sys.executable, "-m", "dml.cli", *argv],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
        check=False,
    )
