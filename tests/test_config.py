"""Typed config: YAML + dotted overrides, and one-line errors that name the key."""

from __future__ import annotations

import pytest
import yaml

from dml.cli import main
from dml.config import apply_overrides, load_config, save_config
from dml.errors import ConfigError


def write(tmp_path, payload) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(payload))
    return str(path)


def test_yaml_and_overrides_resolve(tmp_path):
    path = write(tmp_path, {"prepare": {"workers": 2, "split": {"mode": "sample"}}})
    config = load_config(
        path,
        [
            "prepare.split.train_fraction=0.25",
            "data.augment.horizontal_flip=false",
            "prepare.source.class_names=[a, b]",
        ],
    )
    assert config.prepare.workers == 2 and config.prepare.split.mode == "sample"
    assert config.prepare.split.train_fraction == 0.25
    assert config.data.augment.horizontal_flip is False
    assert config.prepare.source.class_names == ["a", "b"]


def test_saved_config_round_trips(tmp_path):
    config = load_config(None, ["seed=7", "data.batch_size=16"])
    saved = save_config(config, tmp_path / "out" / "config.yaml")
    assert load_config(saved) == config


def test_unknown_key_names_closest_valid_key(tmp_path):
    path = write(tmp_path, {"prepare": {"split": {"trian_fraction": 0.3}}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "unknown config key 'prepare.split.trian_fraction'" in str(err.value)
    assert "did you mean 'prepare.split.train_fraction'" in str(err.value)


def test_unknown_top_level_section():
    with pytest.raises(ConfigError, match="did you mean 'prepare'"):
        load_config(None, ["prepar.workers=2"])


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("prepare.workers=many", "config key 'prepare.workers'"),
        ("prepare.split.mode=random", "config key 'prepare.split.mode'"),
        ("prepare.split.train_fraction=1.5", "less than or equal to 1"),
        ("data.mean=[0.5, 0.5]", "mean has 2 values"),
    ],
)
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["train.max_steps=3", "train.max_steps=4"], "train.max_steps"),
        (["train.max_steps=3", "seed=1", "train.max_steps=3"], "train.max_steps"),  # same value: still twice
        (["loss.kind=cosface", "loss.margin=0.2", " loss.kind =arcface"], "loss.kind"),
    ],
)
def test_override_given_twice_is_refused_in_one_line(tmp_path, capsys, overrides, key):
    with pytest.raises(ConfigError, match=f"override key '{key}' is given twice"):
        apply_overrides({}, overrides)
    assert main(["config", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"'{key}' is given twice" in err, err


def test_override_must_be_key_value():
    with pytest.raises(ConfigError, match="not of the form key=value"):
        apply_overrides({}, ["prepare.workers"])


def test_missing_or_invalid_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=f"config file {tmp_path} is a folder; give a YAML file"):
        load_config(tmp_path)
    (tmp_path / "base").mkdir()
    (tmp_path / "child.yaml").write_text("extends: base\n")
    with pytest.raises(ConfigError, match=r"base is a folder \(extended by .*child.yaml\)"):
        load_config(tmp_path / "child.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("prepare: [unclosed")
    with pytest.raises(ConfigError, match=r"not valid YAML: line 1, column 19: expected ',' or '\]'"):
        load_config(bad)


@pytest.mark.parametrize("depth", [0, 1, 2, 3])
@pytest.mark.parametrize("position", ["first", "last"])
def test_key_given_twice_at_any_depth_is_refused_naming_file_and_line(tmp_path, capsys, depth, position):
    # plain YAML keeps the last value: a second 'model:' section silently dropped the first's settings
    sections = ["train", "model", "evaluate", "export"][: depth + 1]
    keys = ["epochs", "backbone"] if position == "first" else ["backbone", "epochs"]
    lines = [f"{'  ' * level}{name}:" for level, name in enumerate(sections)]
    indent = "  " * len(sections)
    lines += [f"{indent}{keys[0]}: 1", f"{indent}{keys[1]}: 2", f"{indent}{keys[0]}: 3"]
    path = tmp_path / "twice.yaml"
    path.write_text("seed: 0\n" + "\n".join(lines) + "\n")
    assert main(["config", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert str(path) in err and f"line {len(lines) + 1}, column {len(indent) + 1}" in err
    assert f"key '{keys[0]}' appears twice" in err


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "latin-1", "cp1252"])
def test_config_file_in_any_encoding_is_read_or_one_line(tmp_path, capsys, encoding):
    # Windows editors save UTF-16 with a BOM; latin-1 'é' in a comment raised UnicodeDecodeError
    path = tmp_path / "c.yaml"
    path.write_bytes("prepare:\n  workers: 3  # café\n".encode(encoding))
    code = main(["config", "--config", str(path)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if encoding in ("utf-8", "utf-8-sig", "utf-16"):
        assert code == 0 and load_config(path).prepare.workers == 3
    else:
        assert code == 2 and len(err.strip().splitlines()) == 1 and str(path) in err, err


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    path = write(tmp_path, {"prepare": {"wrkers": 1}})
    code = main(["prepare", "--config", path])
    err = capsys.readouterr().err.strip()
    assert code == 2
    # the file is named: the README promises it, and with `extends:` two files may hold the key
    assert err.startswith(f"dml prepare: error: {path}: unknown config key 'prepare.wrkers'") and "\n" not in err


def test_extends_merges_sections_key_by_key(tmp_path):
    (tmp_path / "base.yaml").write_text(
        yaml.safe_dump(
            {
                "seed": 3,
                "data": {"batch_size": 32, "image_size": 64},
                "distill": {"teacher": "runs/t", "label_weight": 0.5},
            }
        )
    )
    child = tmp_path / "sub" / "child.yaml"
    child.parent.mkdir()
    child.write_text(
        yaml.safe_dump(
            {
                "extends": "../base.yaml",
                "data": {"batch_size": 8},
                "distill": {"student": {"backbone": "mobilenetv2_100"}},
            }
        )
    )
    config = load_config(child, ["distill.label_weight=0.0"])
    assert config.seed == 3 and config.data.image_size == 64 and config.data.batch_size == 8
    assert config.distill.teacher == "runs/t" and config.distill.student.backbone == "mobilenetv2_100"
    assert config.distill.label_weight == 0.0


def test_extends_errors_name_the_files(tmp_path):
    loop_a, loop_b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    loop_a.write_text("extends: b.yaml\n")
    loop_b.write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(loop_a)
    orphan = tmp_path / "orphan.yaml"
    orphan.write_text("extends: gone.yaml\n")
    with pytest.raises(ConfigError, match=r"gone.yaml \(extended by .*orphan.yaml\)"):
        load_config(orphan)


@pytest.mark.parametrize("student", ["mobilenetv2_100", "mobilenetv4_conv_small"])
def test_student_configs_extend_the_quickstart(student):
    from pathlib import Path

    import torch

    from dml.models import build_embedding_model

    config = load_config(Path(__file__).parents[1] / "configs" / "students" / f"{student}.yaml")
    quickstart = load_config(Path(__file__).parents[1] / "configs" / "quickstart.yaml")
    assert config.distill.student.backbone == student
    assert config.distill.teacher == quickstart.distill.teacher
    assert config.export.model_path.startswith(config.distill.run_dir)
    model = build_embedding_model(student, config.distill.student.embedding_dim, in_chans=config.data.channels).eval()
    with torch.no_grad():
        out = model(torch.zeros(2, config.data.channels, config.data.image_size, config.data.image_size))
    assert out.shape == (2, 128)


def test_cli_config_prints_the_resolved_config(capsys):
    from pathlib import Path

    student = Path(__file__).parents[1] / "configs" / "students" / "mobilenetv2_100.yaml"
    assert main(["config", "--config", str(student), "seed=5"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert "extends" not in printed and printed["seed"] == 5
    assert printed["distill"]["student"]["backbone"] == "mobilenetv2_100"
    assert printed["distill"]["teacher"] == "runs/quickstart/teacher"
    assert printed["data"]["image_size"] == 28  # from the quickstart it extends
