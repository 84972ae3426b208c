"""A small RecordIO writer for tests, written from the format's description (not MXNet's code).

It writes what an insightface set holds: payloads ``<IfQQ`` header (+ float32 label array when
the label is a sequence) + image bytes, records framed by magic / length word / padding, a
payload containing the magic at a 4-byte aligned position cut into continuation parts, and a
``key<TAB>offset`` index.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)


def pack_payload(label: float | Sequence[float], image: bytes = b"", ident: int = 0) -> bytes:
    """Header + labels + image; a sequence label is written as an array (flag = its length)."""
    if isinstance(label, (int, float)):
        return struct.pack("<IfQQ", 0, float(label), ident, 0) + image
    values = [float(v) for v in label]
    return struct.pack("<IfQQ", len(values), 0.0, ident, 0) + struct.pack(f"<{len(values)}f", *values) + image


def _part(cflag: int, data: bytes) -> bytes:
    pad = (-len(data)) % 4
    return MAGIC_BYTES + struct.pack("<I", (cflag << 29) | len(data)) + data + b"\0" * pad


def frame(payload: bytes) -> bytes:
    """One record as it lies in the file; cut at every aligned occurrence of the magic."""
    cuts = [i for i in range(0, len(payload) - 3, 4) if payload[i : i + 4] == MAGIC_BYTES]
    if not cuts:
        return _part(0, payload)
    pieces, start = [], 0
    for cut in cuts:
        pieces.append(payload[start:cut])
        start = cut + 4
    pieces.append(payload[start:])
    flags = [1] + [2] * (len(pieces) - 2) + [3]
    return b"".join(_part(f, p) for f, p in zip(flags, pieces, strict=True))


def write_recordio(
    folder: Path,
    payloads: Sequence[bytes],
    keys: Sequence[int] | None = None,
    name: str = "train",
    prop: str | None = None,
) -> list[int]:
    """Write ``<name>.rec`` / ``<name>.idx`` (and ``property``) in ``folder``; return the offsets."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(range(len(payloads))) if keys is None else list(keys)
    offsets, blob = [], bytearray()
    for payload in payloads:
        offsets.append(len(blob))
        blob += frame(payload)
    (folder / f"{name}.rec").write_bytes(bytes(blob))
    (folder / f"{name}.idx").write_text("".join(f"{k}\t{o}\n" for k, o in zip(keys, offsets, strict=True)))
    if prop is not None:
        (folder / "property").write_text(prop)
    return offsets
