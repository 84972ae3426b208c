"""The model card describes the pipeline's own preprocessing: a deployer who follows it with
plain PIL + numpy on the raw image files, and runs the exported ONNX model with ONNX Runtime,
gets the embeddings `dml evaluate` computed for the same files."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from PIL import Image, ImageOps

from dml.config import DMLConfig
from dml.data.manifest import manifest_digest
from dml.data.shards import write_shards
from dml.data.transforms import build_eval_transform
from dml.errors import DMLError
from dml.eval.embed import Embeddings
from dml.eval.run import run_evaluate
from dml.eval.shard_lookup import iter_split_samples, read_sample_metadata
from dml.export.run import run_export
from dml.models.model_file import build_model, save_final_model

pytestmark = pytest.mark.slow  # a prepare, an evaluation and an ONNX export: ~40 s on 2 cores
CLASSES, PER_CLASS = 3, 6
SIZES = [(45, 61), (61, 45), (20, 24), (33, 33), (80, 37), (24, 70)]  # down- and upscaled, not square


def photo_bytes(seed: int, size: tuple[int, int], fmt: str, orientation: int, grey: bool) -> bytes:
    """A smooth random photo (so resize filters differ) with an EXIF orientation tag."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (4, 4) if grey else (4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)
    noise = rng.integers(-20, 21, np.asarray(image).shape)
    image = Image.fromarray(np.clip(np.asarray(image).astype(int) + noise, 0, 255).astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, exif=exif.tobytes(), **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def apply_card(card: dict, path: Path) -> np.ndarray:
    """The card's recipe, with nothing but PIL and numpy: decode (orientation, channels),
    resize, scale to [0, 1], normalise, NCHW float32 (1, C, H, W)."""
    pre = card["preprocessing"]
    assert pre["in_graph"] is False and pre["value_range"] == [0.0, 1.0]
    channels, height, width = pre["input_size"]
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image).convert("RGB" if pre["channel_order"] == "RGB" else "L")
    if pre["center_crop"] is not None:  # the central fraction of each side, centred as torchvision rounds
        keep_w, keep_h = (max(1, round(side * pre["center_crop"])) for side in image.size)
        left, top = round((image.width - keep_w) / 2), round((image.height - keep_h) / 2)
        image = image.crop((left, top, left + keep_w, top + keep_h))
    resized = image.resize((width, height), getattr(Image.Resampling, pre["resize_interpolation"].upper()))
    pixels = np.asarray(resized, np.float32).reshape(height, width, channels) / 255.0
    normalised = (pixels - np.asarray(pre["mean"], np.float32)) / np.asarray(pre["std"], np.float32)
    return normalised.transpose(2, 0, 1)[None].astype(np.float32)


@pytest.fixture(scope="module", params=[None, 0.8], ids=["whole-image", "center-crop"])
def exported(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("card")
    for c in range(CLASSES):
        folder = root / "src" / f"class_{c}"
        folder.mkdir(parents=True)
        for i in range(PER_CLASS):
            seed = c * 100 + i
            fmt, ext = (("JPEG", "jpg"), ("PNG", "png"))[i % 2]
            data = photo_bytes(seed, SIZES[i], fmt, orientation=1 + (seed % 8), grey=i == 3)
            (folder / f"img_{i}.{ext}").write_bytes(data)
    config = DMLConfig.model_validate(
        {
            "seed": 0,
            "prepare": {
                "source": {"path": str(root / "src")},
                "output_dir": str(root / "shards"),
                "split": {"mode": "sample", "train_fraction": 0.2, "query_fraction": 0.5},
            },
            "data": {
                "shard_dir": str(root / "shards"),
                "image_size": 32,
                "channels": 3,
                "num_workers": 0,
                "mean": (0.45, 0.4, 0.35),
                "std": (0.25, 0.3, 0.2),
                "batch_size": 8,
                "center_crop": request.param,
            },
            "model": {"backbone": "resnet18", "embedding_dim": 16},
            "evaluate": {"model_path": str(root / "run"), "output_dir": str(root / "eval")},
            "export": {
                "model_path": str(root / "run"),
                "output_dir": str(root / "export"),
                "formats": ["onnx"],
                "parity_images": 8,
            },
        }
    )
    write_shards(config.prepare)
    torch.manual_seed(0)
    (root / "run").mkdir()
    save_final_model(build_model(config), config, root / "run" / "model.pt", manifest_digest(root / "shards"))
    evaluation = run_evaluate(config)
    export = run_export(config)
    return root, evaluation, export, config


def test_card_states_the_pipelines_resize_not_the_backbones_pretrained_default(exported):
    _, _, export, _ = exported
    pre = export.card["preprocessing"]
    assert pre["resize_interpolation"] == "bilinear"  # timm's resnet18 default would say bicubic
    assert "BILINEAR" in pre["resize"] and "orientation" in pre["decode"]


def test_card_recipe_with_pil_and_numpy_reproduces_dml_evaluate(exported):
    root, evaluation, export, _ = exported
    card = json.loads(Path(export.card_path).read_text())
    session = onnxruntime.InferenceSession(str(export.files["onnx"]), providers=["CPUExecutionProvider"])
    metadata = read_sample_metadata(root / "shards", ["query", "gallery"])
    cosines = []
    for split in ("query", "gallery"):
        embedded = Embeddings.load(Path(evaluation.embeddings_dir), split)
        assert len(embedded.keys) > 0
        for key, vector in zip(embedded.keys, embedded.vectors, strict=True):
            path = root / "src" / metadata[key]["source"]
            assert path.is_file(), path
            inputs = apply_card(card, path)
            (onnx_vector,) = session.run([card["output"]["name"]], {card["input"]["name"]: inputs})[0]
            cosines.append(float(np.dot(onnx_vector, vector) / np.linalg.norm(onnx_vector) / np.linalg.norm(vector)))
    assert len(cosines) >= CLASSES * PER_CLASS * 0.6
    assert min(cosines) >= 0.9999, sorted(cosines)[:5]


def test_card_recipe_gives_the_input_tensor_of_the_pipelines_transform(exported):
    # The model is only mildly sensitive to the filter (bicubic gives cosines ~0.9998), so the
    # inputs themselves are compared too: the card's recipe on the raw file against the
    # evaluation transform on the stored shard sample.
    root, _, export, config = exported
    transform = build_eval_transform(config.data)
    compared = 0
    for sample in iter_split_samples(root / "shards", ["query", "gallery"]):
        stored = Image.open(io.BytesIO(sample.get("jpg") or sample["png"]))
        source = root / "src" / json.loads(sample["json"])["source"]
        expected = transform(stored).numpy()[None]
        assert np.abs(apply_card(export.card, source) - expected).max() < 1e-5, source
        compared += 1
    assert compared >= CLASSES * PER_CLASS * 0.6


def test_export_puts_on_the_card_the_metrics_of_the_report_it_is_told(exported, tmp_path):
    _root, evaluation, export, config = exported
    assert export.card["metrics"] == {}  # export.report_path unset: no report is guessed from the model's folder

    def told(report_path: str) -> DMLConfig:
        section = config.export.model_copy(update={"report_path": report_path, "output_dir": str(tmp_path / "out")})
        return config.model_copy(update={"export": section})

    card = run_export(told(evaluation.report_path)).card
    assert card["metrics"] == json.loads(Path(evaluation.report_path).read_text())["headline"]
    assert card["metrics"]["map_at_r"] == evaluation.metrics["map_at_r"]
    with pytest.raises(
        DMLError, match=r"^export.report_path: no evaluation report at .*missing.json: run `dml evaluate`"
    ):
        run_export(told(str(tmp_path / "missing.json")))
    (tmp_path / "other.json").write_text("[1, 2]")
    with pytest.raises(DMLError, match=r"^export.report_path: .*other.json is not a `dml evaluate` report"):
        run_export(told(str(tmp_path / "other.json")))
