"""Small real image sources written to a temp dir: folder trees, CSV/Parquet tables, IDX, npz."""

from __future__ import annotations

import gzip
import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def image_bytes(seed: int, size: tuple[int, int] = (24, 20), fmt: str = "PNG", mode: str = "RGB") -> bytes:
    """A random image encoded as ``fmt``; distinct seeds give distinct pixels."""
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buffer, format=fmt)
    return buffer.getvalue()


def make_folder_tree(root: Path, classes: int = 4, per_class: int = 6, bad: bool = True) -> dict[str, int]:
    """Write ``root/class_i/*.{png,jpg,pgm}``; with ``bad`` add corrupt, empty, truncated and
    non-image files. Returns counts: good, bad."""
    formats = [("PNG", "png"), ("JPEG", "jpg"), ("PPM", "pgm")]
    good = 0
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            fmt, ext = formats[i % len(formats)]
            mode = "L" if ext == "pgm" else "RGB"
            (folder / f"img_{i:03d}.{ext}").write_bytes(image_bytes(c * 100 + i, fmt=fmt, mode=mode))
            good += 1
    bad_count = 0
    if bad:
        (root / "class_0" / "empty.png").write_bytes(b"")
        (root / "class_1" / "garbage.jpg").write_bytes(b"this is not a jpeg at all" * 10)
        full = image_bytes(999, size=(64, 64), fmt="JPEG")
        (root / "class_2" / "truncated.jpg").write_bytes(full[: len(full) // 2])
        (root / "class_3" / "notes.txt").write_text("not an image")
        (root / "class_3" / "dangling.png").symlink_to(root / "no-such-file.png")  # broken link
        bad_count = 5
    return {"good": good, "bad": bad_count}


IDX_CODES = {">u1": 0x08, ">i1": 0x09, ">i2": 0x0B, ">i4": 0x0C, ">f4": 0x0D, ">f8": 0x0E}


def write_idx(path: Path, array: np.ndarray, gz: bool, dtype: str = ">u1") -> None:
    """An IDX file holding ``array`` as ``dtype`` (one of `IDX_CODES`; uint8 by default)."""
    header = struct.pack(">BBBB", 0, 0, IDX_CODES[dtype], array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(dtype).tobytes()
    if gz:
        with gzip.open(path, "wb") as handle:
            handle.write(data)
    else:
        path.write_bytes(data)


def make_idx_dir(root: Path, gz: bool = True, n_train: int = 60, n_test: int = 20, classes: int = 5) -> None:
    """MNIST-style IDX pair files (train and t10k) with random 28x28 images."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)), gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(n) % classes, gz)


def make_omniglot_dir(root: Path, classes: tuple[int, int] = (6, 4), per_class: int = 5) -> None:
    """The Omniglot npz layout with small random strokes."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for name, n in zip(("images_background.npz", "images_evaluation.npz"), classes, strict=True):
        images = rng.random((n, per_class, 105, 105)) > 0.1
        labels = np.repeat(np.arange(n)[:, None], per_class, axis=1)
        np.savez(root / name, images=images, labels=labels)
