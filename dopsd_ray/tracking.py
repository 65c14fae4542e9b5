"""MLflow tracking: one MLflow run per training run, reused across restarts.

Where runs go (first match wins):
  1. the MLFLOW_TRACKING_URI environment variable (a shared server on clusters),
  2. cfg.tracking.tracking_uri,
  3. a SQLite file on the driver's disk, run_dir/mlflow.db (a node cache when run_dir is
     an object store: local_store), with artifacts in run_dir/mlartifacts. Browse it with
     `mlflow ui --backend-store-uri sqlite:///<abs run_dir>/mlflow.db`. When the run's
     processes may be on other nodes, the driver serves this store to them through an
     `mlflow server` of its own (tracking_server.py).

The driver calls `MlflowRun.start_or_resume(cfg, uri)` once; it writes the run id to
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
from .storage import Storage, is_uri, join, node_cache

RUN_ID_FILE = "mlflow_run_id.txt"
STORE_FILE = "mlflow.db"
NONFINITE_METRIC = "tracking/skipped_nonfinite_metrics"
_MAX_METRICS_PER_BATCH = 1000


@runtime_checkable
class MetricSink(Protocol):
    """Where the learner sends metrics and images: an `MlflowRun`, or a `ListSink` in tests."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_image(self, image: Any, artifact_file: str) -> None: ...

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None: ...

    def log_text(self, text: str, artifact_file: str) -> None: ...

    def set_tag(self, key: str, value: Any) -> None: ...


class ListSink:
    """A MetricSink that keeps everything in memory (for unit tests of code that logs)."""

    def __init__(self):
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.images: dict[str, Any] = {}
        self.artifacts: list[tuple[str, str | None]] = []
        self.texts: dict[str, str] = {}
        self.tags: dict[str, str] = {}

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_image(self, image: Any, artifact_file: str) -> None:
        self.images[artifact_file] = image

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.artifacts.append((str(path), artifact_path))

    def log_text(self, text: str, artifact_file: str) -> None:
        self.texts[artifact_file] = text

    def set_tag(self, key: str, value: Any) -> None:
        self.tags[key] = str(value)


def configured_uri(cfg: Config) -> str | None:
    """MLFLOW_TRACKING_URI, else cfg.tracking.tracking_uri, else None (the default local store)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.tracking_uri or None


def local_store(cfg: Config) -> Path:
    """The folder of the default SQLite store, on this node: the run dir, or, when that is an
    object store, a folder of this node's cache (its mlflow.db is copied to the run dir at the end)."""
    if is_uri(cfg.run_dir):
        return node_cache("mlflow", cfg.run_dir.split("://", 1)[1].replace("/", "_"))
    return Storage(cfg.run_dir).make_dir()


def tracking_uri(cfg: Config) -> str:
    """MLFLOW_TRACKING_URI, else cfg.tracking.tracking_uri, else SQLite in local_store(cfg)."""
    return configured_uri(cfg) or f"sqlite:///{local_store(cfg)}/{STORE_FILE}"


def artifacts_destination(cfg: Config) -> str:
    """Where the default store keeps artifacts: run_dir/mlartifacts (a path, or a URI)."""
    return join(cfg.run_dir, "mlartifacts") if is_uri(cfg.run_dir) else (Path(cfg.run_dir).resolve() / "mlartifacts").as_uri()


def mlflow_ui_command(cfg: Config) -> str:
    """The command that browses run `cfg`'s store after the run (its artifacts included)."""
    uri = tracking_uri(cfg)
    if configured_uri(cfg):
        return f"mlflow ui --backend-store-uri {uri}" if not uri.startswith("http") else f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri} --artifacts-destination {artifacts_destination(cfg)}"


def _artifact_location(uri: str, cfg: Config) -> str | None:
    """Local SQLite stores keep artifacts next to the run; servers choose their own."""
    return artifacts_destination(cfg) if uri.startswith("sqlite:") else None


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


def _existing_run_id(client: MlflowClient, store: Storage) -> str | None:
    """The stored run id, if the file exists and the run still lives in the store."""
    if not store.is_file(RUN_ID_FILE):
        return None
    run_id = store.read_text(RUN_ID_FILE).strip()
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None  # e.g. the store was wiped or the URI now points elsewhere
    if run.info.lifecycle_stage == "deleted":
        return None
    return run_id


def _forget_artifact_repository(run_id: str) -> None:
    """MLflow keeps one artifact repository per run id for the life of a process, bound to the
    address of the server it first went through; a run reopened through another server (the
    driver's own, on a new port: a relaunch in this process) must not send artifacts to the old one."""
    from mlflow.tracking._tracking_service import utils

    cache = getattr(utils, "_artifact_repos_cache", None)
    if cache is not None:
        cache.pop(run_id, None)


class MlflowRun:
    """A handle on one MLflow run, usable from any process. Implements MetricSink."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri = tracking_uri
        self._run_id = run_id
        self.client = MlflowClient(tracking_uri=tracking_uri)
        _forget_artifact_repository(run_id)
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
    def start_or_resume(cls, cfg: Config, uri: str | None = None) -> "MlflowRun":
        """Create the run on the first start; reuse it (run id in run_dir) on restarts. `uri`:
        the store to use (the driver's tracking server), else tracking_uri(cfg)."""
        uri = uri or tracking_uri(cfg)
        client = MlflowClient(tracking_uri=uri)
        store = Storage(cfg.run_dir)

        run_id = _existing_run_id(client, store)
        if run_id is not None:
            if client.get_run(run_id).info.status != RunStatus.to_string(RunStatus.RUNNING):
                client.update_run(run_id, status="RUNNING")
            client.set_tag(run_id, "dopsd.resumed_at", time.strftime("%Y-%m-%dT%H:%M:%S"))
            return cls(uri, run_id)

        exp_id = _experiment_id(client, cfg.tracking.experiment, _artifact_location(uri, cfg))
        run = client.create_run(
            exp_id,
            run_name=cfg.train.run_name,
            tags={"dopsd.run_dir": store.uri},
        )
        run_id = run.info.run_id
        params = _params(cfg)
        for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(run_id, params=params[i : i + MAX_PARAMS_TAGS_PER_BATCH])
        store.write(RUN_ID_FILE, run_id + "\n")
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
