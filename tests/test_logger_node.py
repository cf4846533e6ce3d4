"""``logger=mlflow`` builds what its YAML says: the factory of the job's run, not a Lightning
logger; the run it starts (or reopens) gives the Lightning logger, bound to that run."""

from __future__ import annotations

from pathlib import Path

from hydra.utils import instantiate
from pytorch_lightning.loggers import Logger

from rescalelab.tracking import MlflowRunFactory, TrackedRun
from tests.helpers import client, compose_train, tracking_uri


def test_logger_node_builds_the_run_factory_whose_run_gives_the_lightning_logger(root: Path):
    uri = tracking_uri(root)
    cfg = compose_train("norm=bn", f"logger.tracking_uri={uri}", "logger.system_metrics=null")
    factory = instantiate(cfg.logger)
    assert type(factory) is MlflowRunFactory and not isinstance(factory, Logger)
    assert cfg.logger._target_ == "rescalelab.tracking.MlflowRunFactory"

    (root / "out").mkdir()
    run = factory.start(cfg, overrides=["norm=bn"], output_dir=str(root / "out"))
    assert isinstance(run, TrackedRun)
    logger = run.logger()
    assert isinstance(logger, Logger) and logger.run_id == run.run_id  # no run of its own
    logger.log_metrics({"train/loss": 2.5}, step=3)
    assert logger.close() == 0  # delivered: nothing left undelivered
    run.end("FINISHED")

    again = factory.reopen(run.run_id)  # resume: the same run, a new logger bound to it
    assert again.run_id == run.run_id and again.logger().run_id == run.run_id
    recorded = client(root).get_run(run.run_id)
    assert recorded.info.status == "FINISHED"
    assert client(root).get_experiment(recorded.info.experiment_id).name == "rescalelab"
    assert recorded.data.params["norm._target_"].endswith("BatchNorm")
    assert recorded.data.tags["rescalelab.overrides"] == "norm=bn"
    assert [
        (m.step, m.value) for m in client(root).get_metric_history(run.run_id, "train/loss")
    ] == [(3, 2.5)]
    assert len(client(root).search_runs([recorded.info.experiment_id])) == 1
