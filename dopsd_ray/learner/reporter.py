"""Everything learner rank 0 writes or tells, in one place; the other ranks get `Quiet`.

    metrics     every step: MLflow, and the driver's progress bar (progress.py)
    grid        sample grids: <run dir>/samples/step_NNNNNN.png (+ the base row's file), MLflow
    export      the student, loadable: <run dir>/export[/step_NNNNNN], MLflow
    stopped     why the loop ended early: printed, and an MLflow tag
    stop_requested()   the driver's stop flag (stop.StopWatch), read without waiting on the driver

Per-step reports (metrics, progress) go out from a background thread in order, so a step
never waits on MLflow or on a queue on the driver's node; close() sends what is left and
raises what failed. Grids and exports are written at once (a resumed run reads them).
"""

import math
import queue
import tempfile
import threading
from pathlib import Path

import torch

from ..families import comfyui_keys, pipeline_class
from ..preview import BASE_FILE, load_base, save_base, validation_grid
from ..progress import progress_report
from ..storage import Storage
from ..tracking import MlflowRun


class Quiet:
    """A learner rank other than 0: takes part in every gather, writes nothing."""

    writes = False

    def stop_requested(self) -> bool:
        return False

    def metrics(self, step: int, row: dict) -> None:
        pass

    def log(self, step: int, row: dict) -> None:
        pass

    def base_row(self, images, val, steps: int) -> torch.Tensor | None:
        return None

    def saved_base(self, val, steps: int) -> torch.Tensor | None:
        return None

    def grid(self, step: int, val, steps: int, student, teacher, base=None) -> torch.Tensor | None:
        return None

    def export(self, step: int, weights, student: dict, final: bool) -> None:
        pass

    def say(self, message: str, tag: str | None = None) -> None:
        pass

    def close(self) -> None:
        pass


class Reporter(Quiet):
    """Learner rank 0's reports for run `cfg`. `tracking`: (tracking_uri, run_id) of the driver's
    MLflow run, or a MetricSink (tests); `progress`: the driver's progress queue; `stop`: a
    stop.StopWatch (or anything with requested())."""

    writes = True

    def __init__(self, cfg, tracking=None, progress=None, stop=None):
        self.cfg, self.progress, self.stop = cfg, progress, stop
        self.run = Storage(cfg.run_dir)
        self.mlflow = MlflowRun.attach(*tracking) if isinstance(tracking, tuple) else tracking
        self._jobs: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._send, name="reporter", daemon=True)
        self._thread.start()

    # -- the background sender -------------------------------------------------------
    def _send(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                if self._error is None:
                    job()
            except BaseException as err:  # raised in the loop's thread at the next report
                self._error = err

    def _later(self, job) -> None:
        if self._error is not None:
            raise self._error
        self._jobs.put(job)

    def close(self) -> None:
        """Send what is queued, stop the sender; raise what failed."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error

    # -- per step ------------------------------------------------------------------------
    def stop_requested(self) -> bool:
        return self.stop is not None and self.stop.requested()

    def metrics(self, step: int, row: dict) -> None:
        train = self.cfg.train
        if self.mlflow and step % train.log_every == 0:
            self._later(lambda: self.mlflow.log_metrics(row, step=step))
        if self.progress is not None and "loss" in row:  # the driver draws the bar (progress.py)
            report = progress_report(step, train.steps, row["loss"], row["images_per_s"])
            self._later(lambda: self.progress.put(report))

    def log(self, step: int, row: dict) -> None:
        """MLflow metrics at `step`, whatever train.log_every."""
        if self.mlflow:
            self._later(lambda: self.mlflow.log_metrics(row, step=step))

    def say(self, message: str, tag: str | None = None) -> None:
        """Print `message`; with `tag`, also set it as that MLflow tag."""
        print(message, flush=True)
        if tag and self.mlflow:
            self._later(lambda: self.mlflow.set_tag(tag, message))

    # -- files -----------------------------------------------------------------------------
    def saved_base(self, val, steps: int) -> torch.Tensor | None:
        """A resumed run's base row, as saved at step 0 (None if missing or made for other columns)."""
        return load_base(self.run, f"samples/{BASE_FILE}", val, steps)

    def grid(self, step: int, val, steps: int, student, teacher, base=None) -> torch.Tensor | None:
        """The grid of this step (preview.py), with `base` as its base row; at step 0 the student
        row is the base: it is saved, and returned. Returns the base row kept from here on."""
        if base is None and student is not None and step == 0:
            base = self.base_row(student, val, steps)
        image = validation_grid(val, student, teacher, f"student step {step}", base=base)
        name = f"samples/step_{step:06d}.png"
        self.run.write_with(name, lambda p: image.save(p, format="PNG"))
        if self.mlflow:
            self.mlflow.log_image(image, name)
        return base

    def base_row(self, images: torch.Tensor, val, steps: int) -> torch.Tensor:
        return save_base(self.run, f"samples/{BASE_FILE}", images, val, steps)

    def export(self, step: int, weights, student: dict, final: bool) -> None:
        """The student (`student`: its gathered state) in export/step_NNNNNN when the step is a
        multiple of train.export_every, and in export/ when `final`; logged to MLflow under the
        same paths (the files alone: export/ also holds the step folders, logged each on its own)."""
        family, every = self.cfg.model.family, self.cfg.train.export_every
        names = ([f"export/step_{step:06d}"] if every and step % every == 0 else []) + (["export"] if final else [])
        for name in names:
            with tempfile.TemporaryDirectory(prefix="dopsd-export-") as tmp:
                weights.export(Path(tmp), pipeline_class(family), state=student, comfyui=comfyui_keys(family))
                self.run.put_dir(tmp, name)
                if self.mlflow:
                    for f in sorted(p for p in Path(tmp).iterdir() if p.is_file()):
                        self.mlflow.log_artifact(str(f), name)
        if final:
            self.run.write("config.resolved.json", self.cfg.model_dump_json(indent=2))


def step_row(result, sums: list[float], world: int, extra: dict) -> dict:
    """A step's MLflow row: rank-averaged loss, rank-summed throughput, and `extra`
    (grad_norm, lr, memory, counters, sync), from the loop's StepResult and agreed `sums`
    (loss, trained states, images, over every rank)."""
    metrics = dict(result.metrics)
    metrics.pop("trained_states", None)
    loss, trained, images = sums
    step_s = result.step_seconds
    return {
        **metrics,
        # a non-finite loss stays NaN: MLflow drops it (and counts it), the step shows in count/skipped_nonfinite
        "loss": loss / world if math.isfinite(loss) else math.nan,
        "staleness": result.staleness,
        "rollout_seconds": result.rollout_seconds,
        "learner/wait_fraction": result.waited / step_s if step_s else 0.0,
        "learner/compute_seconds": result.compute_seconds,
        "learner/step_seconds": step_s,
        "images_per_s": images / step_s,
        "trained_states_per_s": trained / step_s,
        **extra,
    }
