"""Is the last finished chained run still current? The scheduled retrain's decision.

A scheduled run retrains only when some stage of the chain would do work: its outputs are
missing, its last attempt did not finish (a crash: the chain resumes it), or one of its
inputs (`pipeline.stage_specs`: config sections, data manifest, upstream model files) differs from
the inputs its stamp records. Otherwise the run is skipped, with the reason.

Prefect-free: the same answer in a flow, a test or a script.
"""

from __future__ import annotations

from dml.errors import DMLError
from pipeline.config import PipelineRunConfig
from pipeline.stage_cache import read_stamp
from pipeline.stage_specs import StageSpec, build_spec, chained_stages

# What each cache input of `pipeline.stage_specs` means, for the reason a user reads.
INPUT_NAMES = {
    "config": "its config",
    "source": "the raw data",
    "manifest": "the data manifest",
    "teacher": "the teacher model",
    "model": "the model it reads",
    "report": "the student's report",
}


def changed_inputs(spec: StageSpec, recorded: dict) -> list[str]:
    """Names of ``spec``'s inputs whose digest differs from ``recorded`` (a stamp's inputs)."""
    return [name for name, digest in spec.inputs.items() if recorded.get(name) != digest]


def stage_reason(spec: StageSpec) -> str | None:
    """Why ``spec``'s stage would run (None: its stamp proves its outputs current)."""
    stamp = read_stamp(spec.output_dir)
    if stamp is None or stamp.get("stage") != spec.name:
        return f"{spec.name}: no finished run in {spec.output_dir}"
    if stamp.get("key") != spec.key:
        changed = changed_inputs(spec, stamp.get("inputs", {})) or ["its inputs"]
        return f"{spec.name}: {' and '.join(INPUT_NAMES.get(name, name) for name in changed)} changed"
    if stamp.get("status") != "done":
        return f"{spec.name}: the last attempt did not finish (it resumes in {spec.output_dir})"
    if not (spec.output_dir / spec.done_file).is_file():
        return f"{spec.name}: {spec.output_dir / spec.done_file} is missing"
    return None


def stale_reason(config: PipelineRunConfig) -> str | None:
    """The first stage of the chained run that would do work, and why; None when every
    stage's outputs are current (a scheduled run then skips). Stages are checked in order,
    so a later stage's inputs (upstream model hashes) are only read once they exist."""
    for stage in chained_stages(config):
        try:
            spec = build_spec(stage, config)
        except (ValueError, DMLError) as exc:
            return f"{stage}: {exc}"
        reason = stage_reason(spec)
        if reason is not None:
            return reason
    return None
