"""Training progress on the driver: a tqdm bar on a terminal, plain lines anywhere else.

The learners run inside Ray Train workers, whose stdout is no terminal and reaches the
driver line by line behind a prefix, so no bar can be drawn there. Learner rank 0 puts a
progress_report into a queue (a ray.util.queue.Queue the driver made) after every step,
and the driver, blocked in trainer.fit(), draws from it in a background thread:

    a terminal:                  tqdm bar, with loss, img/s and the ETA beside it
    no terminal (ray job logs):  one line every train.log_every steps, and at the last:
        step 120/2000  loss 0.01234  3.1 img/s  eta 00:41:10

The ETA comes from the recent step rate (StepRate), measured on the learner's clock.
"""

import math
import queue
import sys
import threading
import time
from collections import deque


def progress_report(step: int, total: int, loss: float, images_per_s: float) -> dict:
    """What learner rank 0 sends after step `step` (counted from 1) of `total`."""
    return {"step": step, "total": total, "loss": loss, "images_per_s": images_per_s, "time": time.time()}


class StepRate:
    """Steps per second over the last `window` steps, the first step left out.

    The first step after a (re)start is slower than the rest (lazy allocations, the first
    gathers, caches warming): its report only starts the clock. A report whose step does not
    follow the last one (a learner restarted from a checkpoint) starts it again."""

    def __init__(self, window: int = 20):
        self.points = deque(maxlen=window + 1)  # (time, step)

    def add(self, t: float, step: int) -> None:
        if self.points and step <= self.points[-1][1]:
            self.points.clear()
        self.points.append((t, step))

    def per_second(self) -> float | None:
        if len(self.points) < 2:
            return None
        (t0, s0), (t1, s1) = self.points[0], self.points[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 else None

    def eta_seconds(self, total: int) -> float | None:
        rate = self.per_second()
        return (total - self.points[-1][1]) / rate if rate else None


def format_eta(seconds: float | None) -> str:
    """HH:MM:SS (hours past 24 too), or --:--:-- while the rate is unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "--:--:--"
    s = int(round(seconds))
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def format_line(report: dict, eta_s: float | None) -> str:
    return (f"step {report['step']}/{report['total']}  loss {report['loss']:.5f}  "
            f"{report['images_per_s']:.3g} img/s  eta {format_eta(eta_s)}")


class ProgressPrinter(threading.Thread):
    """Draws the reports arriving in `reports` (a queue.Queue or ray.util.queue.Queue) on
    `stream` until stop(). A tqdm bar when `stream` is a terminal, else plain lines every
    `log_every` steps and at the last."""

    def __init__(self, reports, log_every: int, stream=None):
        super().__init__(daemon=True, name="progress")
        self.reports, self.log_every = reports, log_every
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.rate = StepRate()
        self.bar = None
        self._stopping = threading.Event()

    def run(self) -> None:
        while True:
            try:
                report = self.reports.get(block=True, timeout=0.2)
            except queue.Empty:
                if self._stopping.is_set():  # stopped, and every report is drawn
                    break
                continue
            self.show(report)
        if self.bar is not None:
            self.bar.close()

    def stop(self) -> None:
        self._stopping.set()
        self.join()

    def show(self, report: dict) -> None:
        self.rate.add(report["time"], report["step"])
        eta = self.rate.eta_seconds(report["total"])
        if not self.tty:
            if report["step"] % self.log_every == 0 or report["step"] == report["total"]:
                print(format_line(report, eta), file=self.stream, flush=True)
            return
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=report["total"], initial=report["step"], file=self.stream, dynamic_ncols=True,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")
        self.bar.n = report["step"]
        self.bar.set_postfix_str(f"loss {report['loss']:.5f}, {report['images_per_s']:.3g} img/s, "
                                 f"eta {format_eta(eta)}")
