"""A clean stop: SIGTERM or SIGINT to the driver (`kill`, Ctrl-C, `ray job stop`).

    with StopSignals() as signals:        the driver, around the whole run
        flag = ray.remote(StopFlag)...    the learners' end: StopWatch(flag), rank 0 asks it every step
        result = fit(trainer, signals, flag)

The first signal only records itself: `fit` (the driver's main thread, polling) passes it on
to the StopFlag actor, learner rank 0 sees it (StopWatch) and the step's agreement tells the
other ranks, and every rank then checkpoints the current step through the normal path (unless the
last checkpoint is that step) and returns. The driver stops the rollout workers, ends the
MLflow run KILLED and raises RunStopped; jobs/train.py exits 128 + the signal's number.
A second signal stops the driver at once (KeyboardInterrupt), without that checkpoint.

`ray job stop` sends SIGTERM to the job's entrypoint and its child processes, waits
RAY_JOB_STOP_WAIT_TIME_S (3 s by default) and then sends SIGKILL (Ray's job supervisor):
too short for a step and a checkpoint. Submit with a longer wait, e.g.
`ray job submit --runtime-env-json '{"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "300"}}' ...`;
the supervisor reads it from the job's runtime environment.

`fit` runs trainer.fit() in a thread: in the main thread Ray Train replaces the SIGINT
handler with its own, which aborts the run (no checkpoint).
"""

import os
import signal
import threading
import time

import ray

SIGNALS = (signal.SIGTERM, signal.SIGINT)
STOP_WAIT_ENV = "RAY_JOB_STOP_WAIT_TIME_S"  # Ray's job supervisor: seconds between SIGTERM and SIGKILL
STOP_WAIT_DEFAULT_S = 3  # its default (ray/dashboard/modules/job/job_supervisor.py)


class RunStopped(Exception):
    """The run stopped on a signal, cleanly; `signum` is the signal's number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class StopFlag:
    """Set once by the driver, read by learner rank 0 every step (a small actor: the learners
    may run on other nodes, where the driver's memory and files are out of reach)."""

    def __init__(self):
        self.signum = 0

    def set(self, signum: int) -> None:
        self.signum = signum

    def get(self) -> int:
        """0, or the number of the signal that asked for the stop."""
        return self.signum


class StopWatch:
    """The learners' end of a StopFlag actor: learner rank 0 asks requested() every step, and a
    thread beside it polls the actor every `poll_s`, so a step never waits on a call to the
    driver's node. (The thread starts on the first question, in the process that asks.)"""

    def __init__(self, flag, poll_s: float = 0.5):
        self.flag, self.poll_s = flag, poll_s
        self._asked: threading.Event | None = None

    def requested(self) -> bool:
        if self._asked is None:
            self._asked = threading.Event()
            threading.Thread(target=self._poll, name="stop-watch", daemon=True).start()
        return self._asked.is_set()

    def _poll(self) -> None:
        while not self._asked.is_set():
            try:
                if ray.get(self.flag.get.remote()) != 0:
                    self._asked.set()
            except ray.exceptions.RayError:  # the driver is gone: Ray Train ends this worker too
                return
            time.sleep(self.poll_s)

    def __reduce__(self):
        return (StopWatch, (self.flag, self.poll_s))


class StopSignals:
    """Installs SIGTERM / SIGINT handlers in the driver while the run lasts (main thread only;
    elsewhere signals keep their handlers). `signum` is the first signal received, or 0."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum:  # the second one: stop now
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} again: stopping without a checkpoint")
        self.signum = signum  # only Python state here: a handler may interrupt a call into Ray
        # os.write, not print: the handler may interrupt a print in this thread (a reentrant write fails)
        os.write(2, f"\n{self.name}: stopping after the current step with a checkpoint; "
                    "send it again to stop at once\n".encode())

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


def fit(trainer, signals: StopSignals, flag) -> "ray.train.Result":
    """trainer.fit() in a thread, passing a stop request on to the learners' StopFlag `flag`."""
    if signals.signum:  # before the learners start: nothing to checkpoint
        raise RunStopped(f"stopped by {signals.name} before training started", signals.signum)
    out = {}

    def run():
        try:
            out["result"] = trainer.fit()
        except BaseException as err:  # re-raised in the driver's thread
            out["error"] = err

    thread = threading.Thread(target=run, name="fit", daemon=True)
    thread.start()
    told = False
    while thread.is_alive():
        thread.join(0.5)  # the signal handlers run here, in the main thread
        if signals.signum and not told:
            ray.get(flag.set.remote(signals.signum))
            told = True
    if "error" in out:
        raise out["error"]
    return out["result"]


def stop_wait_note() -> str:
    """Under `ray job submit` without a stop wait of its own: one line on how to lengthen it."""
    return (f"note: `ray job stop` sends SIGKILL {STOP_WAIT_DEFAULT_S} s after SIGTERM ({STOP_WAIT_ENV}), too soon "
            f"for a checkpoint; submit with --runtime-env-json '{{\"env_vars\": {{\"{STOP_WAIT_ENV}\": \"300\"}}}}' "
            "to stop with one")
