"""Stage log files and the one-line failure reason found in them."""

from __future__ import annotations

import re
from pathlib import Path

from dml.clock import utc_now

CLI_ERROR = re.compile(r"dml [a-z]+: error: (.+)$")
# "ValueError: message" or a bare "KeyboardInterrupt" on its own line (a traceback's last
# line), not "ModuleNotFoundError(...)" inside a logged message.
EXCEPTION_LINE = re.compile(
    r"^\s*(?:[A-Za-z_][\w.]*\.)?([A-Za-z_]\w*(?:Error|Exception|Failed|Interrupt|Exit))(?::.*)?$"
)
# torchrun's wrapper exception says only that a child failed; the child's own error is better.
UNINFORMATIVE = ("ChildFailedError",)


def start_log(log_path: Path, stage: str, launcher: str, key: str) -> Path:
    """Append an attempt header to the stage log (earlier attempts stay in the file)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a") as handle:
        handle.write(f"===== {utc_now()} stage {stage} (launcher {launcher}, key {key[:12]}) =====\n")
    return log_path


def tail(log_path: Path, lines: int = 200) -> str:
    """The last ``lines`` lines of a log ("" when it does not exist)."""
    try:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def failure_reason(log_text: str, fallback: str) -> tuple[str, bool]:
    """(reason, input_error) from a failed stage's output: the `dml` CLI's one-line
    ``error:`` (an input problem a retry will not fix), else the last exception line, else
    ``fallback``."""
    cli_errors = [m.group(1).strip() for line in log_text.splitlines() if (m := CLI_ERROR.search(line))]
    if cli_errors:
        return cli_errors[-1], True
    exceptions = [(m.group(1), line.strip()) for line in log_text.splitlines() if (m := EXCEPTION_LINE.match(line))]
    useful = [text for name, text in exceptions if name not in UNINFORMATIVE]
    if useful:
        return useful[-1], False
    return fallback, False
