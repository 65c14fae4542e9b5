"""The driver's side of a clean stop and of where a job's outputs go, in process and fast.
The whole path (learners checkpoint and return, MLflow KILLED, nothing left on the cluster,
`ray job stop`, a relative output dir under `ray job submit`) runs in tests/test_job_submit.py."""

import os
import signal

import pytest

from dopsd_ray.jobenv import RAY_JOB_CONFIG_JSON_ENV_VAR, output_dir
from dopsd_ray.stop import RunStopped, StopSignals, fit


def test_the_first_signal_is_recorded_the_second_stops_at_once_and_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopSignals() as signals:
        assert signals.signum == 0
        os.kill(os.getpid(), signal.SIGTERM)  # a real signal, handled in this (the main) thread
        assert (signals.signum, signals.name) == (signal.SIGTERM, "SIGTERM")
        with pytest.raises(KeyboardInterrupt, match="again"):
            os.kill(os.getpid(), signal.SIGINT)
        assert signals.signum == signal.SIGTERM  # the first one names the stop
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_a_signal_before_training_starts_stops_without_starting_it():
    class Trainer:
        def fit(self):
            raise AssertionError("fit() started after a stop request")

    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(RunStopped, match="stopped by SIGINT before training started") as err:
            fit(Trainer(), signals, flag=None)
    assert err.value.signum == signal.SIGINT


def test_a_relative_output_dir_under_a_ray_job_goes_home_not_into_the_working_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(RAY_JOB_CONFIG_JSON_ENV_VAR, raising=False)
    assert output_dir("outputs") == str(tmp_path / "outputs")  # run by hand: the current directory
    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, "{}")  # what Ray's job supervisor sets for the entrypoint
    assert output_dir("outputs") == str(tmp_path / "home" / "dopsd-ray" / "outputs")
    assert output_dir("runs/../outputs") == str(tmp_path / "home" / "dopsd-ray" / "outputs")
    assert output_dir(str(tmp_path / "abs")) == str(tmp_path / "abs")  # an absolute path is kept
    assert output_dir("~/mine") == str(tmp_path / "home" / "mine")
    assert output_dir("s3://bucket/runs/") == "s3://bucket/runs"  # an object store: as it is
