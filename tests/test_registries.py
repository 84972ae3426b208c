"""Every registered name is reachable from config and builds its class; unknown names are
refused when the config loads (with the closest one) and never fall back to a default.

The cases are keyed by (registry key, name) and the tests are parametrised over the registries'
contents, so an entry added without a case here fails `test_every_entry_has_a_case`.
"""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data_fixtures import image_bytes, make_folder_tree, make_idx_dir, make_omniglot_dir
from dml.config import DMLConfig, load_config
from dml.data.sources import open_source
from dml.errors import ConfigError
from dml.losses.miners import PairMasks, Triplets
from dml.models.neck import EmbeddingNeck
from dml.registries import REGISTRIES, RegisteredName, Registry, registry_table
from dml.train.objective import Objective, build_margin, build_pair_loss
from pipeline.config import PipelineRunConfig
from pipeline.registries import LAUNCHERS
from recordio_writer import pack_payload, write_recordio

README = Path(__file__).resolve().parents[1] / "README.md"
ALL_REGISTRIES = (*REGISTRIES, LAUNCHERS)  # dml's and the pipeline's
ENTRIES = [(registry, name) for registry in ALL_REGISTRIES for name in registry.names()]
IDS = [f"{registry.key}={name}" for registry, name in ENTRIES]


def entry_config(registry: Registry, name: str, *more: str) -> DMLConfig:
    """The default config with ``registry.key=name`` and what that entry needs beside it."""
    return load_config(
        None,
        [f"{registry.key}={name}", *CASES[(registry.key, name)], *more],
        check_backbones=False,
        model=PipelineRunConfig,
    )


# (key, name) -> the other overrides its config needs
CASES: dict[tuple[str, str], list[str]] = {
    ("loss.kind", "arcface"): [],
    ("loss.kind", "cosface"): [],
    ("loss.kind", "sphereface"): ["loss.margin=1.5"],
    ("loss.kind", "combined"): [],
    ("loss.kind", "normsoftmax"): [],
    ("loss.kind", "triplet"): ["data.pk_classes=4"],
    ("loss.kind", "contrastive"): ["data.pk_classes=4"],
    ("loss.kind", "multisimilarity"): ["data.pk_classes=4"],
    ("loss.miner", "multisimilarity"): ["loss.kind=multisimilarity", "data.pk_classes=4"],
    ("loss.miner", "distance_weighted"): ["loss.kind=triplet", "loss.mining=all", "data.pk_classes=4"],
    ("model.pooling", "avg"): [],
    ("model.pooling", "max"): [],
    ("model.pooling", "gem"): [],
    ("model.pooling", "cls"): ["model.backbone=test_vit"],
    ("prepare.source.kind", "folder"): [],
    ("prepare.source.kind", "csv"): [],
    ("prepare.source.kind", "parquet"): [],
    ("prepare.source.kind", "idx"): [],
    ("prepare.source.kind", "omniglot"): [],
    ("prepare.source.kind", "recordio"): [],
    ("pipeline.launcher", "inprocess"): [],
    ("pipeline.launcher", "torchrun"): ["pipeline.nproc_per_node=3"],
    ("pipeline.launcher", "kubernetes"): ["pipeline.namespace=ns1", "pipeline.image=img:1"],
}


def test_every_entry_has_a_case():
    missing = [f"{registry.key}={name}" for registry, name in ENTRIES if (registry.key, name) not in CASES]
    assert not missing, f"registered names without a test case in CASES: {missing}"


@pytest.mark.parametrize(("registry", "name"), ENTRIES, ids=IDS)
def test_every_target_is_a_class_with_a_summary(registry, name):
    assert isinstance(registry.get(name), type) and registry.entry(name).summary


def _batch(seed: int = 0, classes: int = 4, per_class: int = 4, dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(per_class)
    return torch.randn(classes * per_class, dim, generator=generator, dtype=torch.float64), labels


@pytest.mark.parametrize("name", [n for r, n in ENTRIES if r.kind == "margin"])
def test_margins_are_built_from_loss_kind(name):
    registry = next(r for r in ALL_REGISTRIES if r.kind == "margin")
    config = entry_config(registry, name)
    margin = build_margin(config)
    assert type(margin) is registry.get(name) and margin.s == config.loss.scale
    cosine = torch.tensor([[0.6, 0.1, -0.2], [0.3, 0.8, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    logits = margin(cosine, labels)
    target = logits[torch.arange(2), labels] / margin.s
    others = logits.masked_fill(torch.nn.functional.one_hot(labels, 3).bool(), 0) / margin.s
    assert torch.allclose(others, cosine.masked_fill(torch.nn.functional.one_hot(labels, 3).bool(), 0))
    if name == "normsoftmax":
        assert torch.allclose(target, cosine[torch.arange(2), labels])
    else:  # a margin lowers the target logit
        assert bool((target < cosine[torch.arange(2), labels]).all())


@pytest.mark.parametrize("name", [n for r, n in ENTRIES if r.kind == "pair loss"])
def test_pair_losses_are_built_from_loss_kind(name):
    registry = next(r for r in ALL_REGISTRIES if r.kind == "pair loss")
    config = entry_config(registry, name)
    loss = build_pair_loss(config)
    assert type(loss) is registry.get(name) and loss.miner is None
    embeddings, labels = _batch()
    value = loss(embeddings, labels)
    assert value.ndim == 0 and torch.isfinite(value) and float(value) > 0


@pytest.mark.parametrize("name", [n for r, n in ENTRIES if r.kind == "miner"])
def test_miners_are_wired_into_the_pair_loss(name):
    """`loss.miner` reaches the pair loss the objective trains with: its loss is the loss over
    exactly the mined pairs or triplets, which differs from the loss over all of them."""
    registry = next(r for r in ALL_REGISTRIES if r.kind == "miner")
    config = entry_config(registry, name, "loss.miner_epsilon=0.05")
    loss = build_pair_loss(config)
    assert type(loss.miner) is registry.get(name)
    embeddings, labels = _batch(seed=1)
    mined = registry.build(name, settings=config)(embeddings, labels)  # same seed: same draws
    if isinstance(mined, Triplets):
        expected = loss(embeddings, labels, triplets=mined)
    else:
        assert isinstance(mined, PairMasks)
        expected = loss(embeddings, labels, pairs=mined)
    loss.miner = registry.build(name, settings=config)
    assert torch.allclose(loss(embeddings, labels), expected)
    plain = build_pair_loss(load_config(None, CASES[(registry.key, name)], check_backbones=False))
    assert plain.miner is None and not torch.allclose(plain(embeddings, labels), expected)
    objective = Objective(config, num_classes=4, device=torch.device("cpu"))
    total, _ = objective(embeddings.float().requires_grad_(), labels)
    assert type(objective.pair_loss.miner) is registry.get(name) and torch.isfinite(total)


def test_distance_weighted_miner_draws_the_same_triplets_from_the_same_seed():
    # every rank mines the same gathered batch: the seed must make their draws equal
    registry = next(r for r in ALL_REGISTRIES if r.kind == "miner")
    config = entry_config(registry, "distance_weighted", "seed=7")
    embeddings, labels = _batch(seed=2)
    first, second = (registry.build("distance_weighted", settings=config)(embeddings, labels) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("name", [n for r, n in ENTRIES if r.kind == "pooling"])
def test_poolings_are_built_from_model_pooling(name):
    registry = next(r for r in ALL_REGISTRIES if r.kind == "pooling")
    config = entry_config(registry, name)
    if name == "cls":  # a class token exists only in ViT-family tokens (N, T, C)
        neck = EmbeddingNeck(6, 8, pooling=config.model.pooling, layout="tokens", prefix_tokens=1, has_class_token=True)
        features = torch.rand(2, 10, 6)
    else:
        neck, features = EmbeddingNeck(6, 8, pooling=config.model.pooling), torch.rand(2, 6, 3, 3)
    assert [type(branch.pool) for branch in neck.branches] == [registry.get(name)]
    assert neck(features).shape == (2, 8)


def test_compound_pooling_specs_build_one_branch_per_name():
    registry = next(r for r in ALL_REGISTRIES if r.kind == "pooling")
    names = [name for name in registry.names() if name != "cls"]  # cls: token backbones only
    config = load_config(None, [f"model.pooling={'+'.join(reversed(names))}"], check_backbones=False)
    neck = EmbeddingNeck(6, 9, pooling=config.model.pooling)
    assert [type(branch.pool) for branch in neck.branches] == [registry.get(n) for n in reversed(names)]


def _source_data(kind: str, root: Path) -> Path:
    """A tiny raw data set of ``kind`` under ``root``; returns the path the config names."""
    if kind == "folder":
        make_folder_tree(root, classes=2, per_class=2, bad=False)
        return root
    if kind in ("csv", "parquet"):
        root.mkdir()
        paths = []
        for i in range(4):
            (root / f"{i}.png").write_bytes(image_bytes(i))
            paths.append(str(root / f"{i}.png"))
        table = pa.table({"path": paths, "label": [str(i % 2) for i in range(4)]})
        if kind == "csv":
            table.to_pandas().to_csv(root / "t.csv", index=False)
            return root / "t.csv"
        pq.write_table(table, root / "t.parquet")
        return root / "t.parquet"
    if kind == "idx":
        make_idx_dir(root, n_train=6, n_test=2, classes=2)
        return root
    if kind == "omniglot":
        make_omniglot_dir(root, classes=(2, 2), per_class=2)
        return root
    if kind == "recordio":
        write_recordio(root, [pack_payload(i % 2, image_bytes(i, fmt="JPEG")) for i in range(4)])
        return root
    raise AssertionError(f"no data set for source kind {kind!r}: add one")


@pytest.mark.parametrize("name", [n for r, n in ENTRIES if r.kind == "source kind"])
def test_sources_are_opened_from_prepare_source_kind(name, tmp_path):
    registry = next(r for r in ALL_REGISTRIES if r.kind == "source kind")
    path = _source_data(name, tmp_path / name)
    config = entry_config(registry, name, f"prepare.source.path={path}")
    source = open_source(config.prepare.source.kind, config.prepare.source.path, config.prepare.source.class_names)
    assert type(source) is registry.get(name)
    assert len([r for r in source.records() if r.rejection is None]) >= 4
    assert type(open_source("auto", str(path))) is registry.get(name)  # "auto" finds it too


@pytest.mark.parametrize("name", [n for r, n in ENTRIES if r.kind == "launcher"])
def test_launchers_are_built_from_pipeline_launcher(name):
    from pipeline.launchers import build_launcher

    registry = next(r for r in ALL_REGISTRIES if r.kind == "launcher")
    config = entry_config(registry, name)
    launcher = build_launcher(config.pipeline)
    assert type(launcher) is registry.get(name) and launcher.name == name
    for key in ("nproc_per_node", "namespace", "image"):
        if hasattr(launcher, key):
            assert getattr(launcher, key) == getattr(config.pipeline, key)


def _registered_fields(model, prefix=""):
    """dotted key -> RegisteredName for every registry-backed config key."""
    found = {}
    for name, field in model.model_fields.items():
        marks = [m for m in field.metadata if isinstance(m, RegisteredName)]
        if marks:
            found[f"{prefix}{name}"] = marks[0]
        elif isinstance(field.annotation, type) and hasattr(field.annotation, "model_fields"):
            found.update(_registered_fields(field.annotation, f"{prefix}{name}."))
    return found


def test_each_registry_backs_its_config_key():
    fields = _registered_fields(PipelineRunConfig)  # the pipeline section is checked by pipeline.config
    for registry in ALL_REGISTRIES:
        assert registry in fields[registry.key].registries, registry.key
    assert fields["distill.student.pooling"].registries == fields["model.pooling"].registries


@pytest.mark.parametrize(("registry", "name"), ENTRIES, ids=IDS)
def test_a_misspelt_name_is_refused_at_load_with_the_closest_one(registry, name):
    typo = name + name[-1]
    with pytest.raises(ConfigError) as caught:
        load_config(None, [f"{registry.key}={typo}"], check_backbones=False, model=PipelineRunConfig)
    message = str(caught.value)
    assert "\n" not in message and f"config key '{registry.key}'" in message and f"'{typo}'" in message
    assert f"did you mean '{name}'?" in message, message
    with pytest.raises(ValueError, match=f"did you mean '{re.escape(name)}'"):
        registry.get(typo)  # code that looks a name up directly never falls back either


def test_a_miner_must_fit_its_loss():
    with pytest.raises(ConfigError, match="needs a pair loss"):
        load_config(None, ["loss.miner=multisimilarity"], check_backbones=False)
    with pytest.raises(ConfigError, match=r"mines triplets but loss.kind 'contrastive' takes pairs .*triplet"):
        load_config(
            None, ["loss.kind=contrastive", "loss.miner=distance_weighted", "data.pk_classes=4"], check_backbones=False
        )


def test_registering_a_name_twice_or_a_bad_target_is_an_error():
    registry = Registry("thing", "a.b")
    registry.add("one", "dml.losses.margins:ArcFace", "first")
    with pytest.raises(ValueError, match="registered twice"):
        registry.add("one", "dml.losses.margins:CosFace", "again")
    with pytest.raises(ValueError, match="module:Class"):
        registry.add("two", "dml.losses.margins.CosFace", "no colon")


def test_the_json_schema_lists_the_registered_names():
    schema = DMLConfig.model_json_schema()
    loss = schema["$defs"]["LossConfig"]["properties"]
    assert loss["kind"]["enum"] == [*REGISTRIES[0].names(), *REGISTRIES[1].names()]


def test_the_readme_lists_every_registered_name():
    text = README.read_text()
    begin, end = "<!-- registry-table:begin -->", "<!-- registry-table:end -->"
    assert begin in text and end in text, "README lacks the generated registry table"
    table = text.split(begin, 1)[1].split(end, 1)[0].strip()
    assert table == registry_table(ALL_REGISTRIES), (
        "README's registry table is stale: paste dml.registries.registry_table((*REGISTRIES, LAUNCHERS))"
    )


def test_the_config_stays_torch_free():
    import subprocess
    import sys

    code = (
        "import sys; from dml.config import load_config; load_config(None, ['loss.kind=cosface'], "
        "check_backbones=False); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def mined_objective_worker(info, config_json: str, embeddings: torch.Tensor, labels: torch.Tensor):
    """One rank's share of a batch through the training objective (pair loss + miner)."""
    config = DMLConfig.model_validate_json(config_json)
    rows = torch.arange(embeddings.shape[0]).chunk(info.world_size)[info.rank]
    mine = embeddings[rows].clone().requires_grad_()
    loss, _ = Objective(config, num_classes=4, device=torch.device("cpu"))(mine, labels[rows])
    loss.backward()
    return float(loss), mine.grad


@pytest.mark.dist
@pytest.mark.parametrize("name", [n for r, n in ENTRIES if r.kind == "miner"])
def test_miners_mine_the_gathered_batch_alike_on_every_rank(name):
    """With two gloo processes each rank mines the same gathered batch (the distance-weighted
    miner draws from the config's seed), so each rank's loss is the one-process loss over the
    whole batch and its gradient that loss's, times the world size the engine divides by."""
    from local_group import spawn_local_group

    registry = next(r for r in ALL_REGISTRIES if r.kind == "miner")
    config = entry_config(registry, name, "seed=3")
    embeddings, labels = _batch(seed=4)
    embeddings = embeddings.float()
    whole = embeddings.clone().requires_grad_()
    expected, _ = Objective(config, num_classes=4, device=torch.device("cpu"))(whole, labels)
    expected.backward()
    results = spawn_local_group(mined_objective_worker, 2, args=(config.model_dump_json(), embeddings, labels))
    for rank, (loss, grad) in enumerate(results):
        assert loss == pytest.approx(float(expected.detach()), rel=1e-5), rank
        rows = torch.arange(embeddings.shape[0]).chunk(2)[rank]
        assert torch.allclose(grad, 2 * whole.grad[rows], atol=1e-6), rank
