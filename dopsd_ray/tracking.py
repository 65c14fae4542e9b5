"""MLflow tracking: one MLflow run per training run, reused across restarts.

Where runs go (first match wins):
  1. the MLFLOW_TRACKING_URI environment variable (a shared server on clusters),
  2. cfg.tracking.tracking_uri,
  3. a SQLite file under the run's output dir, run_dir/mlflow.db, with artifacts in
     run_dir/mlartifacts. Browse it with
     `mlflow ui --backend-store-uri sqlite:///<abs run_dir>/mlflow.db`.

The driver calls `MlflowRun.start_or_resume(cfg)` once; it writes the run id to
run_dir/mlflow_run_id.txt, so a restarted job (Ray Train FailureConfig restart, or a
resubmitted `ray job`) appends to the same run. Other processes (learner rank 0 inside
a Ray Train worker) get a handle with `MlflowRun.attach(tracking_uri, run_id)`; pass
`(run.tracking_uri, run.run_id)` to them in train_loop_config.

Everything goes through `MlflowClient` with an explicit run id, never the fluent
`mlflow.start_run()` / active-run state, which lives in one process's globals and does
not survive being shipped to a Ray worker.
"""

import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

from .config import Config, flatten
from .storage import write_atomic

RUN_ID_FILE = "mlflow_run_id.txt"
NONFINITE_METRIC = "tracking/skipped_nonfinite_metrics"
_MAX_METRICS_PER_BATCH = 1000


@runtime_checkable
class MetricSink(Protocol):
    """Where the learner sends metrics and images: an `MlflowRun`, or a `ListSink` in tests."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_image(self, image: Any, artifact_file: str) -> None: ...

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None: ...

    def set_tag(self, key: str, value: Any) -> None: ...


class ListSink:
    """A MetricSink that keeps everything in memory (for unit tests of code that logs)."""

    def __init__(self):
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.images: dict[str, Any] = {}
        self.artifacts: list[tuple[str, str | None]] = []
        self.tags: dict[str, str] = {}

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_image(self, image: Any, artifact_file: str) -> None:
        self.images[artifact_file] = image

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.artifacts.append((str(path), artifact_path))

    def set_tag(self, key: str, value: Any) -> None:
        self.tags[key] = str(value)


def tracking_uri(cfg: Config) -> str:
    """MLFLOW_TRACKING_URI, else cfg.tracking.tracking_uri, else sqlite under the run dir."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    run_dir = cfg.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{run_dir}/mlflow.db"


def _artifact_location(uri: str, cfg: Config) -> str | None:
    """Local SQLite stores keep artifacts next to the run; servers choose their own."""
    if not uri.startswith("sqlite:"):
        return None
    return (cfg.run_dir.resolve() / "mlartifacts").as_uri()


def _experiment_id(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException:
            exp = client.get_experiment_by_name(name)  # another process created it first
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def _params(cfg: Config) -> list[Param]:
    """The flattened config as MLflow params: strings, within MLflow's length limits."""
    params = []
    for key, value in flatten(cfg).items():
        text = "None" if value is None else str(value)
        if len(text) > MAX_PARAM_VAL_LENGTH:
            text = text[: MAX_PARAM_VAL_LENGTH - 3] + "..."
        params.append(Param(key[:MAX_ENTITY_KEY_LENGTH], text))
    return params


def _existing_run_id(client: MlflowClient, run_id_file: Path) -> str | None:
    """The stored run id, if the file exists and the run still lives in the store."""
    if not run_id_file.is_file():
        return None
    run_id = run_id_file.read_text().strip()
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None  # e.g. the store was wiped or the URI now points elsewhere
    if run.info.lifecycle_stage == "deleted":
        return None
    return run_id


class MlflowRun:
    """A handle on one MLflow run, usable from any process. Implements MetricSink."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri = tracking_uri
        self._run_id = run_id
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self._nonfinite_count: int | None = None  # read lazily from the run on first skip

    @property
    def run_id(self) -> str:
        return self._run_id

    @classmethod
    def attach(cls, tracking_uri: str, run_id: str) -> "MlflowRun":
        """A handle on an existing run (learner rank 0, another process); starts nothing."""
        run = cls(tracking_uri, run_id)
        run.client.get_run(run_id)  # fail here, with MLflow's message, if it does not exist
        return run

    @classmethod
    def start_or_resume(cls, cfg: Config) -> "MlflowRun":
        """Create the run on the first start; reuse it (run id in run_dir) on restarts."""
        uri = tracking_uri(cfg)
        client = MlflowClient(tracking_uri=uri)
        run_dir = cfg.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        run_id_file = run_dir / RUN_ID_FILE

        run_id = _existing_run_id(client, run_id_file)
        if run_id is not None:
            if client.get_run(run_id).info.status != RunStatus.to_string(RunStatus.RUNNING):
                client.update_run(run_id, status="RUNNING")
            client.set_tag(run_id, "dopsd.resumed_at", time.strftime("%Y-%m-%dT%H:%M:%S"))
            return cls(uri, run_id)

        exp_id = _experiment_id(client, cfg.tracking.experiment, _artifact_location(uri, cfg))
        run = client.create_run(
            exp_id,
            run_name=cfg.train.run_name,
            tags={"dopsd.run_dir": str(run_dir.resolve())},
        )
        run_id = run.info.run_id
        params = _params(cfg)
        for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(run_id, params=params[i : i + MAX_PARAMS_TAGS_PER_BATCH])
        write_atomic(run_id_file, run_id + "\n")
        return cls(uri, run_id)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log finite values at `step`; non-finite ones are dropped and counted in
        NONFINITE_METRIC (cumulative over the run, also across restarts)."""
        now = int(time.time() * 1000)
        batch, skipped = [], 0
        for key, value in metrics.items():
            value = float(value)
            if not math.isfinite(value):
                skipped += 1
                continue
            batch.append(Metric(key, value, now, step))
        if skipped:
            if self._nonfinite_count is None:
                logged = self.client.get_run(self._run_id).data.metrics.get(NONFINITE_METRIC, 0)
                self._nonfinite_count = int(logged)
            self._nonfinite_count += skipped
            batch.append(Metric(NONFINITE_METRIC, float(self._nonfinite_count), now, step))
        for i in range(0, len(batch), _MAX_METRICS_PER_BATCH):
            self.client.log_batch(self._run_id, metrics=batch[i : i + _MAX_METRICS_PER_BATCH])

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """A file, or a directory (its contents are uploaded under artifact_path)."""
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self._run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self._run_id, str(path), artifact_path)

    def log_image(self, image: Any, artifact_file: str) -> None:
        """A PIL image (or numpy array) saved as artifact_file, e.g. "samples/step_000100.png"."""
        self.client.log_image(self._run_id, image, artifact_file=artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self._run_id, text, artifact_file)

    def set_tag(self, key: str, value: Any) -> None:
        self.client.set_tag(self._run_id, key, str(value))

    def end(self, status: str = "FINISHED") -> None:
        """status: FINISHED, FAILED or KILLED. A later start_or_resume sets RUNNING again."""
        self.client.set_terminated(self._run_id, status=status)

    def __reduce__(self):
        # Ships to Ray workers as (tracking_uri, run_id); the client is rebuilt there.
        return (MlflowRun, (self.tracking_uri, self._run_id))

    def __repr__(self) -> str:
        return f"MlflowRun(tracking_uri={self.tracking_uri!r}, run_id={self._run_id!r})"
