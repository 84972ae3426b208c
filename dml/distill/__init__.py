"""`dml distill`: distil a trained teacher into a compact student on the `dml train` trainer.

- `losses`: absolute / relative teacher (Yu et al. 2019), RKD distance and angle (Park et al. 2019).
- `teacher`: the teacher's identity (sha256 of model.pt) and on-the-fly embedding.
- `teacher_cache`: teacher embeddings of the training split cached next to the shards.
- `objective`: the weighted distillation + label objective for the training loop.
- `run`: `run_distill(config, resume)`, the stage function.
"""

from dml.distill.losses import (
    absolute_teacher_loss,
    pairwise_distances,
    relative_teacher_loss,
    rkd_angle_loss,
    rkd_distance_loss,
)
from dml.distill.objective import DistillObjective


def __getattr__(name: str):
    # Lazy: the losses and the objective load without the trainer behind `run_distill`.
    if name == "run_distill":
        from dml.distill.run import run_distill

        return run_distill
    raise AttributeError(f"module 'dml.distill' has no attribute {name!r}")


__all__ = [
    "DistillObjective",
    "absolute_teacher_loss",
    "pairwise_distances",
    "relative_teacher_loss",
    "rkd_angle_loss",
    "rkd_distance_loss",
    "run_distill",
]
