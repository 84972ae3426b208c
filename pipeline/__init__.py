"""Prefect orchestration of the dml stages: flows (`pipeline.flows`), stage tasks with
stamp-based caching (`pipeline.prefect_tasks`, `pipeline.stage_cache`), launchers (in-process, torchrun,
Kubernetes Job), artifacts, deployments and schedules. No ML here: stages are `dml` calls.

Importing ``pipeline`` itself does not import Prefect; `pipeline.flows` and friends do.
"""
