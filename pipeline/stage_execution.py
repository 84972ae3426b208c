"""Run one stage with its stamp: skip it when its inputs are unchanged, resume it after a
failed attempt with the same inputs, otherwise start it fresh (see `pipeline.stage_cache`).

Prefect-free, so the skip logic is the same under a flow, in a test, or from a script.
"""

from __future__ import annotations

import logging

from dml.config import DMLConfig
from dml.errors import DMLError
from pipeline.errors import StageFailed
from pipeline.launchers import Launcher
from pipeline.stage_cache import claim_output_dir, write_stamp
from pipeline.stage_specs import StageOutcome, build_spec, read_result

log = logging.getLogger(__name__)


def execute_stage(stage: str, config: DMLConfig, launcher: Launcher) -> StageOutcome:
    """Run (or skip) ``stage`` of the pipeline for ``config``; raises `StageFailed`."""
    try:
        spec = build_spec(stage, config)
    except (ValueError, DMLError) as exc:  # e.g. the upstream model.pt is missing
        raise StageFailed(stage, f"cannot start: {exc}", None, input_error=True) from None
    decision, stamp = claim_output_dir(spec.output_dir, spec.name, spec.key, spec.done_file)
    if decision == "cached":
        assert stamp is not None  # a cached output dir has its stamp
        log.info("%s: inputs unchanged (key %s): using %s", stage, spec.key[:12], spec.output_dir)
        return StageOutcome(stage, "cached", spec.key, str(spec.output_dir), str(spec.log_path), stamp["result"])
    log.info(
        "%s: %s run via %s -> %s",
        stage,
        "resuming" if decision == "resume" else "fresh",
        launcher.name,
        spec.output_dir,
    )
    write_stamp(spec.output_dir, stage, spec.key, "running", spec.inputs)
    launcher.launch(spec, resume=decision == "resume")
    if not (spec.output_dir / spec.done_file).is_file():
        raise StageFailed(stage, f"finished without writing {spec.output_dir / spec.done_file}", spec.log_path)
    result = read_result(spec)
    write_stamp(spec.output_dir, stage, spec.key, "done", spec.inputs, result)
    return StageOutcome(stage, "ran", spec.key, str(spec.output_dir), str(spec.log_path), result)
