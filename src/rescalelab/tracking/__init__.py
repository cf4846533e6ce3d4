"""Everything MLflow: the store, the run of each job, sweep parent runs. Nothing else imports mlflow."""

from rescalelab.tracking.run import MlflowRunFactory, TrackedRun, flatten, read_parent, run_name
from rescalelab.tracking.store import default_tracking_uri, ensure_experiment

__all__ = [
    "MlflowRunFactory",
    "TrackedRun",
    "default_tracking_uri",
    "ensure_experiment",
    "flatten",
    "read_parent",
    "run_name",
]
