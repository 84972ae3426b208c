"""Names and schedule defaults of the scheduled retrain, shared by the flow, its deployments
and the `dml pipeline` commands (Prefect-free, so `dml`'s parser can read them)."""

FLOW_NAME = "dml-nightly-retrain"  # the flow `pipeline.flows.nightly_retrain`
DEPLOYMENT = "dml-nightly"  # default deployment name of `dml pipeline serve` / `deploy`
NIGHTLY_CRON = "0 2 * * *"  # 02:00 every day
