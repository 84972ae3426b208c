"""Class indices do not depend on the process: labels of equal integer value ('1', '01') got
their order from a set, which Python's string hashing reorders in every process, so partitions
of one job computed different plans ('holds shards of a different source/config') and shards
were not byte-identical across runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from data_fixtures import image_bytes

LABEL_SETS = [["1", "01", "001", "2"], ["0", "-0", "00", "-1", "-01", "10"], ["7", "07", "007", "0007", "3"]]


def test_class_order_is_the_same_under_every_hash_seed():
    code = (
        "import json, sys; from dml.data.plan import sorted_class_names; "
        "print(json.dumps([sorted_class_names(set(labels)) for labels in json.loads(sys.argv[1])]))"
    )
    orders = set()
    for seed in range(8):
        env = {**os.environ, "PYTHONHASHSEED": str(seed)}
        run = subprocess.run(
            [sys.executable, "-c", code, json.dumps(LABEL_SETS)], env=env, capture_output=True, text=True, check=True
        )
        orders.add(run.stdout.strip())
    assert len(orders) == 1, orders
    for order, labels in zip(json.loads(orders.pop()), LABEL_SETS, strict=True):
        assert [int(x) for x in order] == sorted(int(x) for x in labels)


def test_prepared_classes_and_shards_are_the_same_under_every_hash_seed(tmp_path):
    (tmp_path / "img").mkdir()
    labels = LABEL_SETS[0] * 2
    for i in range(len(labels)):
        (tmp_path / "img" / f"{i}.png").write_bytes(image_bytes(i))
    (tmp_path / "t.csv").write_text("path,label\n" + "".join(f"img/{i}.png,{x}\n" for i, x in enumerate(labels)))
    outcomes = set()
    for seed in range(4):
        out = tmp_path / f"out{seed}"
        env = {**os.environ, "PYTHONHASHSEED": str(seed)}
        subprocess.run(
            [
                sys.executable,
                "-m",
                "dml.cli",
                "prepare",
                f"prepare.source.path={tmp_path / 't.csv'}",
                f"prepare.output_dir={out}",
                "prepare.split.mode=sample",
            ],
            env=env,
            check=True,
            capture_output=True,
        )
        manifest = json.loads((out / "manifest.json").read_text())
        outcomes.add((tuple(manifest["classes"]), manifest["plan_digest"]))
    assert len(outcomes) == 1, outcomes
