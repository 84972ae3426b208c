"""Training: engine (DDP or DeepSpeed), objective, loop, checkpoints, schedules, SWA."""
