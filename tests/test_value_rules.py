"""Values the library refuses at run time are refused when the config is loaded, with the key
named, and both sides agree: margins and scales of the margin heads, evaluation ks and FARs."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from dml.cli import main
from dml.config import LossConfig, load_config
from dml.errors import ConfigError
from dml.eval import retrieval_metrics, verification_metrics
from dml.losses.partial_fc import PartialFC
from dml.registries import MARGINS
from dml.value_rules import MARGIN_RANGES

JUST = 1e-6  # how far past an edge "just outside" is
RANGED = {"arcface": "ArcFace", "cosface": "CosFace", "sphereface": "SphereFace"}  # loss.kind -> its rule


def test_every_ranged_margin_kind_is_covered():
    """A new margin kind with a range must join RANGED, or this module tests nothing about it."""
    ranged = {n for n in MARGINS.names() if MARGINS.entry(n).target.rpartition(":")[2] in MARGIN_RANGES}
    assert ranged == set(RANGED)


def margin_values(rule: str, seed: int) -> list[float]:
    """Both edges, just inside and just outside each, and random values around the range."""
    low, high = MARGIN_RANGES[rule]
    values = [low, low + JUST, low - JUST, -5.0, 5.0, 100.0]
    if math.isfinite(high):
        values += [high, high - JUST, high + JUST]
    rng = random.Random(seed)
    return values + [rng.uniform(-4.0, 8.0) for _ in range(20)]


def config_refusal(overrides: list[str]) -> str | None:
    """The ConfigError line of loading the defaults with ``overrides``, or None when accepted."""
    try:
        load_config(None, overrides, check_backbones=False)
    except ConfigError as exc:
        return str(exc)
    return None


def head_refusal(loss: LossConfig) -> str | None:
    """The ValueError of building the head training builds for ``loss`` (the registry's
    params, as `dml.train.objective.build_margin`), or None when it builds."""
    try:
        MARGINS.build(loss.kind, settings=SimpleNamespace(loss=loss))
    except ValueError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("kind", sorted(RANGED))
def test_margin_edges_accepted_and_just_outside_refused_by_config_and_head_alike(kind):
    low, high = MARGIN_RANGES[RANGED[kind]]
    for value in margin_values(RANGED[kind], seed=len(kind)):
        inside = low <= value <= high
        refused = config_refusal([f"loss.kind={kind}", f"loss.margin={value!r}"])
        head = head_refusal(LossConfig.model_construct(kind=kind, margin=value, scale=30.0))
        assert (refused is None) == inside == (head is None), (kind, value, refused, head)
        if refused is not None:
            assert "loss.margin" in refused and kind in refused and "\n" not in refused
            assert head is not None and head in refused  # the head's own words, not a second rule


@pytest.mark.parametrize("kind", ["arcface", "cosface"])
def test_dynamic_margins_take_the_same_range_as_the_kind(kind):
    high = MARGIN_RANGES[RANGED[kind]][1]
    for m_max in (high, high + JUST, 4.0):
        refused = config_refusal([f"loss.kind={kind}", f"loss.dynamic_margin={{m_min: 0.1, m_max: {m_max!r}}}"])
        try:  # the head training builds: per-class margins handed to partial FC (`train_class_margins`)
            PartialFC(8, 2, MARGINS.get(kind)(), class_margins=torch.tensor([0.1, m_max]))
            head = None
        except ValueError as exc:
            head = str(exc)
        assert (refused is None) == (m_max <= high) == (head is None), (kind, m_max, refused, head)
        if refused is not None:
            assert "loss.dynamic_margin.m_max" in refused


@pytest.mark.parametrize("seed", range(3))
def test_combined_margins_config_and_head_agree(seed):
    rng = random.Random(seed)
    pool = [-0.5, -JUST, 0.0, JUST, 0.3, 1.0, 1.5]
    for _ in range(15):
        m1, m2, m3 = (rng.choice(pool) for _ in range(3))
        refused = config_refusal(["loss.kind=combined", f"loss.combined_margins=[{m1!r}, {m2!r}, {m3!r}]"])
        head = head_refusal(LossConfig.model_construct(kind="combined", combined_margins=(m1, m2, m3), scale=30.0))
        assert (refused is None) == (m1 > 0 and m2 >= 0 and m3 >= 0) == (head is None), (m1, m2, m3, refused)
        if refused is not None:
            assert "loss.combined_margins" in refused and head is not None and head in refused


def test_margin_kinds_without_a_margin_ignore_it():
    """normsoftmax and the pair losses never read loss.margin: any value loads."""
    assert config_refusal(["loss.kind=normsoftmax", "loss.margin=-5"]) is None
    assert config_refusal(["loss.kind=triplet", "data.pk_classes=4", "loss.margin=-5"]) is None


@pytest.mark.parametrize(
    "overrides", [["loss.margin=-5"], ["loss.margin=5"], ["loss.kind=sphereface", "loss.margin=0.5"]]
)
def test_dml_train_refuses_a_bad_margin_in_one_line_before_writing(tmp_path, capsys, overrides):
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({"train": {"run_dir": str(tmp_path / "run")}}))
    assert main(["train", "--config", str(path), *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "loss.margin" in err, err
    assert not (tmp_path / "run").exists()  # no config.yaml left behind in a run folder


def value_error(call) -> str | None:
    """The ValueError ``call()`` raises, or None when it returns."""
    try:
        call()
    except ValueError as exc:
        return str(exc)
    return None


EMBEDDINGS = np.random.default_rng(0).normal(size=(12, 4)).astype(np.float32)
LABELS = np.repeat(np.arange(4), 3)


@pytest.mark.parametrize("ks", [[0], [-3], [], [1, 0], [5, 2, 1]])
def test_evaluate_ks_refused_at_load_as_by_the_metrics(ks):
    refused = config_refusal([f"evaluate.ks={ks}"])
    library = value_error(lambda: retrieval_metrics(EMBEDDINGS, LABELS, ks=ks))
    assert (refused is None) == (library is None) == (bool(ks) and min(ks) >= 1), (ks, refused, library)
    if refused is not None:
        assert "evaluate.ks" in refused and library in refused


@pytest.mark.parametrize("fars", [[2], [0], [-1e-3], [1e-3, 1.5], [1.0, 1e-3], []])
def test_evaluate_fars_must_be_rates_at_load_as_in_verification(fars):
    refused = config_refusal([f"evaluate.fars={fars}"])
    library = value_error(lambda: verification_metrics(EMBEDDINGS, LABELS, fars=fars))
    assert (refused is None) == (library is None) == all(0 < f <= 1 for f in fars), (fars, refused, library)
    if refused is not None:
        assert "evaluate.fars" in refused and library in refused
