"""Listing a CSV or Parquet table (``path,label[,split]``): every row becomes a sample or a rejection.

The rules (also in the README, "Input rules"):

- Encodings: UTF-8 with or without a byte-order mark, UTF-16 and UTF-32 with one (Excel's
  "Unicode text"). Anything else is refused in one line naming the file and the problem.
- Delimiter: the first of ``,`` ``\\t`` ``;`` that splits the header into a ``path`` and a
  ``label`` column. Blank lines are not rows.
- A row is rejected (``bad_row``) when it has fewer or more fields than the header, an
  empty or null path or label, or a face box / landmark cell (`dml.data.face_align`) that
  is not a number. Rows are named by their CSV line (header = line 1) or their
  0-based Parquet row index (the manifest entry's ``row``).
- The same path (after normalising ``./``, ``..`` and relative-to-table) listed again with the
  same label: the first row is the input, later ones are ``duplicate`` naming it. Listed with
  different labels: every row of that path is ``label_conflict``, since no label can be trusted.
- A float or decimal label with an integral value (pandas stores integer labels with gaps as
  floats) is read as that integer. Cells are read without surrounding spaces (``a.png, 3``).
  A Parquet path column must hold text (or bytes: a file name as stored), a label column text
  or numbers; other types (lists, structs, dates, ...) stop the run in one line. The split
  cell is kept as given; `dml.data.plan` checks it.
"""

from __future__ import annotations

import codecs
import csv
import io
import math
import os
from collections import defaultdict
from decimal import Decimal
from pathlib import Path

from dml.data.face_align import FACE_COLUMNS, face_marks
from dml.data.records import Record, Rejection
from dml.errors import DataError

REQUIRED = ("path", "label")
DELIMITERS = (",", "\t", ";")
# Longest BOMs first: the UTF-32-LE mark starts with the UTF-16-LE one.
BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)

# One raw row: (row number, path, label, split, problem, face cells). problem is set for a
# malformed row; face cells hold the row's face box / landmark columns (empty without them).
RawRow = tuple[int, object, object, object, str | None, dict]


def decode_table_text(path: Path) -> str:
    """The text of a CSV file in the encoding its byte-order mark names (UTF-8 without one).

    Raises DataError (one line, naming the file) for undecodable bytes or a BOM-less UTF-16 file.
    """
    data = path.read_bytes()
    encoding = next((name for bom, name in BOMS if data.startswith(bom)), "utf-8")
    if encoding == "utf-8" and b"\x00" in data[:4096]:
        raise DataError(
            f"{path}: NUL bytes without a byte-order mark (UTF-16 without BOM?); "
            "save it as UTF-8, or as UTF-16 with a BOM"
        )
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1 if encoding.startswith("utf-8") else "?"
        raise DataError(
            f"{path}: not valid {encoding} text (byte 0x{data[exc.start]:02x} at line {line}); "
            "save it as UTF-8 (spreadsheets: 'CSV UTF-8') or UTF-16 with a BOM"
        ) from None


def _csv_rows(path: Path) -> tuple[list[str], list[RawRow]]:
    text = decode_table_text(path)
    header_line = text.splitlines()[0] if text else ""
    delimiter = next(
        (
            d
            for d in DELIMITERS
            if set(REQUIRED) <= {c.strip() for c in next(csv.reader([header_line], delimiter=d), [])}
        ),
        ",",
    )
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = [c.strip() for c in next(reader, [])]
    if not set(REQUIRED) <= set(header):
        return header, []
    _check_unique(header, path)
    where = {name: header.index(name) for name in ("path", "label", "split", *FACE_COLUMNS) if name in header}
    rows: list[RawRow] = []
    line = reader.line_num + 1
    for fields in reader:
        if fields:  # a blank line is not a row
            problem = (
                None
                if len(fields) == len(header)
                else (
                    f"{'short' if len(fields) < len(header) else 'long'} row: {len(fields)} fields, "
                    f"the header has {len(header)}"
                )
            )
            cell = {name: (fields[i] if i < len(fields) else None) for name, i in where.items()}
            face = {name: cell[name] for name in FACE_COLUMNS if name in cell}
            rows.append((line, cell["path"], cell["label"], cell.get("split"), problem, face))
        line = reader.line_num + 1
    return header, rows


def _parquet_rows(path: Path) -> tuple[list[str], list[RawRow]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        header = list(schema.names)
        if not set(REQUIRED) <= set(header):
            return header, []
        _check_unique(header, path)
        _check_column_types(schema, path)
        columns = [c for c in ("path", "label", "split", *FACE_COLUMNS) if c in header]
        data = pq.read_table(path, columns=columns).to_pydict()
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    splits = data.get("split", [None] * len(data["path"]))
    faces = [{c: data[c][i] for c in FACE_COLUMNS if c in data} for i in range(len(data["path"]))]
    return header, [
        (i, p, lab, s, None, f)
        for i, (p, lab, s, f) in enumerate(zip(data["path"], data["label"], splits, faces, strict=True))
    ]


def _check_unique(header: list[str], path: Path) -> None:
    """Raise DataError when a column this reader uses is named twice (which one is meant?)."""
    if twice := sorted({name for name in ("path", "label", "split", *FACE_COLUMNS) if header.count(name) > 1}):
        raise DataError(
            f"{path}: column '{twice[0]}' appears {header.count(twice[0])} times in the header; "
            "which one holds the data is unclear"
        )


def _check_column_types(schema, path: Path) -> None:
    """Raise DataError unless the path column holds text and the label column text or numbers.

    A list, struct, map, date or binary label became a class named after its Python repr
    (``'[1, 2]'``, ``"{'a': 1}"``); a binary path became ``"b'img/0.png'"``. Binary paths are
    read as file names (bytes, as the file system stores them).
    """
    import pyarrow as pa

    def kind(field_type):
        return kind(field_type.value_type) if pa.types.is_dictionary(field_type) else field_type

    text = (pa.types.is_string, pa.types.is_large_string)
    allowed = {
        "path": (*text, pa.types.is_binary, pa.types.is_large_binary),
        "label": (*text, pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean, pa.types.is_decimal),
    }
    for name, checks in allowed.items():
        if name in schema.names:
            field_type = kind(schema.field(name).type)
            if not any(check(field_type) for check in checks):
                raise DataError(
                    f"{path}: column '{name}' has type {schema.field(name).type}; expected "
                    f"{'text or numbers' if name == 'label' else 'text'}"
                )


def _text(value: object) -> str | None:
    """A cell as text without surrounding spaces (``path, label`` CSVs put one before each
    label); None for a null, NaN or blank cell. Bytes (a binary Parquet path) are a file name."""
    if _is_null(value):
        return None
    if (isinstance(value, float) and value.is_integer()) or (
        isinstance(value, Decimal) and value.is_finite() and value == value.to_integral_value()
    ):
        value = int(value)  # 3.0 and Decimal('3.00') are class 3
    text = os.fsdecode(value) if isinstance(value, bytes) else str(value)
    return text.strip() or None


def _is_null(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _row_record(row: RawRow) -> Record:
    number, path, label, split, problem, cells = row
    path_text, label_text, split_text = _text(path), _text(label), _text(split)
    face = None
    try:
        face = face_marks(cells)
    except ValueError as exc:
        problem = problem or str(exc)
    if problem is None and path_text is None:
        problem = "null path" if _is_null(path) else "empty path"
    if problem is None and label_text is None:
        problem = "null label" if _is_null(label) else "empty label"
    if problem:
        return Record(path_text or "", "", None, Rejection("bad_row", problem), number)
    assert path_text is not None and label_text is not None  # else problem is set above
    return Record(path_text, label_text, split_text.strip().lower() if split_text else None, row=number, face=face)


def _resolve_duplicates(records: list[Record], base: Path, where: str) -> list[Record]:
    """Apply the duplicate-path rule (module docstring) to the rows' records."""
    by_path: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        if r.rejection is None:
            by_path[os.path.normpath(os.path.join(base, r.source_id))].append(i)
    out = list(records)
    for positions in by_path.values():
        first = records[positions[0]]
        labels = {records[i].label for i in positions}
        said = ", ".join(f"{where} {records[j].row}: '{records[j].label}'" for j in positions[:3])
        for n, i in enumerate(positions):
            r = records[i]
            if len(labels) > 1:
                out[i] = r.rejected("label_conflict", f"same path listed with different labels ({said})")
            elif n > 0:
                out[i] = r.rejected("duplicate", f"same path as {where} {first.row}, already an input")
    return out


def list_table(path: Path) -> list[Record]:
    """Every row of a CSV/Parquet table as a sample record or a rejected one.

    Raises DataError (one line) when the file cannot be decoded or lacks a path/label column.
    """
    parquet = path.suffix == ".parquet"
    header, rows = _parquet_rows(path) if parquet else _csv_rows(path)
    if not set(REQUIRED) <= set(header):
        raise DataError(f"{path} needs columns 'path' and 'label' (has {sorted(header)})")
    where = "row" if parquet else "line"
    return _resolve_duplicates([_row_record(row) for row in rows], path.parent, where)
