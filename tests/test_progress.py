"""The driver's progress display: the ETA from the recent step rate, plain lines, the tqdm bar.

(The driver printing these lines from a real run's reports: tests/test_runtime.py.)"""

import io
import queue

import pytest

from dopsd_ray.progress import ProgressPrinter, StepRate, format_eta, format_line


def report(step, t, total=100, loss=0.0123456, images_per_s=3.14159):
    return {"step": step, "total": total, "loss": loss, "images_per_s": images_per_s, "time": t}


def test_eta_comes_from_the_recent_rate_without_the_first_step():
    rate = StepRate(window=4)
    rate.add(100.0, 1)  # step 1 ended at t=100 s, after a slow start: only the clock starts
    assert rate.eta_seconds(100) is None
    for step in range(2, 11):  # then 2 s a step
        rate.add(100.0 + 2 * (step - 1), step)
    assert rate.per_second() == 0.5 and rate.eta_seconds(100) == 180.0
    for step in range(11, 15):  # slower now, 4 s a step: the window of 4 steps holds only these
        rate.add(118.0 + 4 * (step - 10), step)
    assert rate.eta_seconds(100) == 86 * 4.0
    rate.add(500.0, 8)  # a learner restarted from the step-8 checkpoint: the clock starts again
    assert rate.eta_seconds(100) is None
    rate.add(503.0, 9)
    assert rate.eta_seconds(100) == pytest.approx(91 * 3.0)


def test_formatting():
    assert format_eta(2 * 3600 + 41 * 60 + 10.4) == "02:41:10"
    assert format_eta(30 * 3600) == "30:00:00" and format_eta(None) == "--:--:--"
    assert format_line(report(120, 0.0, total=2000), 2470) == "step 120/2000  loss 0.01235  3.14 img/s  eta 00:41:10"
    assert format_line(report(3, 0.0, loss=float("nan")), None) == "step 3/100  loss nan  3.14 img/s  eta --:--:--"


def drawn(reports, log_every, stream):
    q = queue.Queue()
    for r in reports:
        q.put(r)
    printer = ProgressPrinter(q, log_every, stream)
    printer.start()
    printer.stop()  # returns once every report is drawn
    return stream.getvalue()


def test_plain_lines_every_log_every_steps_and_at_the_last():
    out = drawn([report(s, 10.0 * s, total=7) for s in range(1, 8)], 3, io.StringIO())
    assert out.splitlines() == [
        "step 3/7  loss 0.01235  3.14 img/s  eta 00:00:40",
        "step 6/7  loss 0.01235  3.14 img/s  eta 00:00:10",
        "step 7/7  loss 0.01235  3.14 img/s  eta 00:00:00",
    ]


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_a_tqdm_bar_with_loss_rate_and_eta():
    out = drawn([report(s, 10.0 * s, total=7) for s in range(1, 8)], 3, Terminal())
    assert "\r" in out and "step " not in out  # redrawn in place, no plain lines
    last = out.rstrip("\n").split("\r")[-1]
    assert "7/7" in last and "loss 0.01235, 3.14 img/s, eta 00:00:00" in last
