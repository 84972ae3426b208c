"""insightface `.bin` verification files: real layouts load, anything that names code is
refused with one line and never runs, malformed content is one line naming the file."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from dml.errors import DataError
from dml.eval.bin_reader import read_verification_bin, write_verification_bin


class RunsCommand:
    """Pickles to a reduce that calls ``os.system(command)`` when loaded."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class CallsEval:
    def __reduce__(self):
        return (eval, ("__import__('pathlib').Path('EVAL_RAN').touch()",))


def python2_bin(images: list[bytes], flags: list[bool]) -> bytes:
    """A protocol-2 pickle as Python 2 writes it: images as SHORT_BINSTRING opcodes, bools as NEWTRUE/NEWFALSE."""
    out = b"\x80\x02]("  # PROTO 2, EMPTY_LIST, MARK
    for image in images:
        out += b"U" + bytes([len(image)]) + image
    out += b"e](" + b"".join(b"\x88" if f else b"\x89" for f in flags) + b"e\x86."  # APPENDS, TUPLE2, STOP
    return out


def test_protocol_4_and_python2_files_load(tmp_path):
    images = [bytes([i]) * (5 + i) for i in range(6)]
    written = read_verification_bin(write_verification_bin(tmp_path / "a.bin", images, [True, False, True]))
    assert written.images == images and written.is_same.tolist() == [True, False, True]
    (tmp_path / "py2.bin").write_bytes(python2_bin(images, [False, True, True]))
    old = read_verification_bin(tmp_path / "py2.bin")
    assert old.images == images and old.is_same.tolist() == [False, True, True]
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("payload", ["system", "eval", "numpy", "protocol2_bytes"])
def test_anything_naming_a_global_is_refused_and_never_runs(tmp_path, payload, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "SYSTEM_RAN"
    content = {
        "system": ([RunsCommand(f"touch {marker}")], [True]),
        "eval": ([b"a", b"b"], [CallsEval()]),
        "numpy": ([b"a", b"b"], np.array([True])),
        "protocol2_bytes": ([b"a", b"b"], [True]),
    }[payload]
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(content, protocol=2 if payload == "protocol2_bytes" else 4))
    with pytest.raises(DataError) as error:
        read_verification_bin(path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message and "refuses global" in message
    assert not marker.exists() and not (tmp_path / "EVAL_RAN").exists()


@pytest.mark.parametrize(
    "content,expected",
    [
        (b"not a pickle at all", "not a verification .bin"),
        (pickle.dumps(([b"a", b"b"], [True]))[:-6], "not a verification .bin"),
        (pickle.dumps({"images": []}), "expected a pickled (images, is_same) pair"),
        (pickle.dumps(([b"a", "b"], [True])), "image 1 is str"),
        (pickle.dumps(([b"a", b"b"], [2])), "is_same[0] is 2"),
        (pickle.dumps(([b"a", b"b", b"c"], [True])), "3 images for 1 pairs"),
        (pickle.dumps(([], [])), "holds no pairs"),
    ],
)
def test_malformed_files_give_one_line(tmp_path, content, expected):
    path = tmp_path / "bad.bin"
    path.write_bytes(content)
    with pytest.raises(DataError) as error:
        read_verification_bin(path)
    assert expected in str(error.value) and "\n" not in str(error.value) and str(path) in str(error.value)
