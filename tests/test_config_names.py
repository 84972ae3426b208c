"""Name-valued config keys are checked when the config is loaded, with the closest valid name;
`key=value` overrides are accepted anywhere on every subcommand's command line."""

from __future__ import annotations

import argparse
import typing
from typing import Literal

import pytest
from pydantic import BaseModel

from data_fixtures import make_folder_tree
from dml.cli import build_parser, main, parse_args
from dml.config import load_config
from dml.data.manifest import load_manifest
from dml.errors import ConfigError
from dml.registries import RegisteredName
from pipeline.config import PipelineRunConfig


def literal_name_fields(model: type[BaseModel], prefix: str = "") -> dict[str, tuple[list[str], bool]]:
    """Every key whose value is one of a fixed set of names (a Literal or registered names):
    dotted key -> (names, is a tuple)."""
    found = {}
    for name, field in model.model_fields.items():
        annotation, many = field.annotation, False
        if typing.get_origin(annotation) is tuple:
            annotation, many = typing.get_args(annotation)[0], True
        registered = [m for m in field.metadata if isinstance(m, RegisteredName)]
        if registered:
            found[f"{prefix}{name}"] = (registered[0].names(), many)
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found.update(literal_name_fields(annotation, f"{prefix}{name}."))
        elif typing.get_origin(annotation) is Literal:
            names = [v for v in typing.get_args(annotation) if isinstance(v, str)]
            if names:
                found[f"{prefix}{name}"] = (names, many)
    return found


NAME_FIELDS = literal_name_fields(PipelineRunConfig)  # every section, `pipeline` (checked by its package) too


def config_error(*overrides: str, check_backbones: bool = True) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(None, list(overrides), check_backbones=check_backbones, model=PipelineRunConfig)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_the_walk_finds_every_kind_of_name():
    expected = {
        "prepare.source.kind",
        "split.mode",
        "loss.kind",
        "loss.mining",
        "loss.head_optimizer",
        "optimizer.name",
        "schedule.kind",
        "train.backend",
        "train.precision",
        "evaluate.index",
        "distill.absolute_kind",
        "export.formats",
        "pipeline.launcher",
    }
    found = {key.removeprefix("prepare.") if key.startswith("prepare.split") else key for key in NAME_FIELDS}
    assert expected <= found, expected - found


@pytest.mark.parametrize("key", sorted(NAME_FIELDS))
def test_every_unknown_name_is_refused_with_the_closest_one(key):
    names, many = NAME_FIELDS[key]
    for name in names:
        typo = name + "x"
        message = config_error(f"{key}=[{typo}]" if many else f"{key}={typo}", check_backbones=False)
        assert f"'{key}" in message and f"'{typo}'" in message, message  # the key and the value
        assert f"did you mean '{name}'?" in message, message
        assert all(n in message for n in names)  # the valid names are listed


@pytest.mark.parametrize("section", ["model", "distill.student"])
def test_backbone_names_come_from_timm(section):
    message = config_error(f"{section}.backbone=resnet19")
    assert "unknown timm backbone 'resnet19'; did you mean 'resnet18'?" in message
    assert "did you mean 'mobilenetv3_large_100'?" in config_error(f"{section}.backbone=mobilenetv3_large_10")
    assert "pretrained tag" in config_error(f"{section}.backbone=resnet18.no_such_tag")
    config = load_config(None, [f"{section}.backbone=resnet50.a1_in1k"])  # a real tag selects preprocessing
    assert "resnet50" in config.model_dump_json()


@pytest.mark.parametrize("section", ["model", "distill.student"])
def test_pooling_specs_are_checked_part_by_part(section):
    assert "unknown pooling 'foo'" in config_error(f"{section}.pooling=foo")
    assert "unknown pooling 'gen'; did you mean 'gem'?" in config_error(f"{section}.pooling=gen")
    assert "unknown pooling 'mux' in 'avg+mux'; did you mean 'max'?" in config_error(f"{section}.pooling=avg+mux")
    assert "repeats" in config_error(f"{section}.pooling=gem+gem")
    for good in ("avg+max+gem", "GeM", "max + avg"):
        load_config(None, [f"{section}.pooling={good}"])


def test_train_refuses_an_unknown_backbone_in_one_line(capsys):
    assert main(["train", "model.backbone=resnet19"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean 'resnet18'" in err[0] and "Traceback" not in err[0]


def subcommands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every leaf subcommand ("prepare", "pipeline run", ...) and its parser."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(subcommands(sub, (*path, name)) or {(*path, name): sub})
    return found


def test_overrides_are_accepted_anywhere_for_every_subcommand():
    parser = build_parser()
    leaves = subcommands(parser)
    assert {
        ("prepare",),
        ("train",),
        ("evaluate",),
        ("distill",),
        ("export",),
        ("config",),
        ("pipeline", "run"),
    } <= set(leaves)
    for command, sub in leaves.items():
        if not any(action.dest == "overrides" for action in sub._actions):
            continue  # e.g. `pipeline runs` reads a server, it takes no config
        options = []
        # Only one option of a mutually exclusive group (e.g. --cron | --interval) may be given.
        excluded = {id(a) for g in sub._mutually_exclusive_groups for a in g._group_actions[1:]}
        for action in sub._actions:
            flag = next((s for s in action.option_strings if s.startswith("--")), None)
            if flag in (None, "--help", "--config", "--partition", "--merge", "--verify") or id(action) in excluded:
                continue
            # Typed options (counts, seconds) get a number; path-like ones a path.
            value = "5" if action.type not in (None, str) else "some/dir"
            options.append([flag] if action.nargs == 0 else [flag, value])
        argv = [*command, "a.b=1", "--config", "c.yaml", "c.d=2"]
        for i, option in enumerate(options):
            argv += [*option, f"o.k{i}=3"]
        args = parse_args(parser, [*argv, "e.f=4"])
        assert args.overrides == ["a.b=1", "c.d=2", *[f"o.k{i}=3" for i in range(len(options))], "e.f=4"], command
        assert args.config == "c.yaml"
        with pytest.raises(SystemExit):
            parse_args(parser, [*command, "--config", "c.yaml", "x=1", "--no-such-option"])
        with pytest.raises(SystemExit):
            parse_args(parser, [*command, "x=1", "--config", "c.yaml", "not-an-override"])


def test_prepare_applies_overrides_given_after_an_option(tmp_path, capsys):
    make_folder_tree(tmp_path / "src", classes=3, per_class=4, bad=False)
    config = tmp_path / "c.yaml"
    config.write_text(f"prepare: {{source: {{path: {tmp_path / 'src'}}}, output_dir: {tmp_path / 'unused'}}}\n")
    out = tmp_path / "out"
    assert (
        main(
            [
                "prepare",
                "--config",
                str(config),
                "prepare.shards.max_samples=2",
                "--resume",
                f"prepare.output_dir={out}",
            ]
        )
        == 0
    )
    assert load_manifest(out)["config"]["shards"]["max_samples"] == 2
    assert not (tmp_path / "unused").exists()
