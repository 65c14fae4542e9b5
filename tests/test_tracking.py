"""MLflow tracking against a real SQLite store in tmp_path, and the sample grid."""

import math
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from dopsd_ray.config import flatten
from dopsd_ray.recipes import load_config
from dopsd_ray.grid import MIN_CELL, PAD, sample_grid, tensor_to_pil
from dopsd_ray.tracking import NONFINITE_METRIC, RUN_ID_FILE, ListSink, MetricSink, MlflowRun, tracking_uri

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def make_cfg(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def make(*overrides):
        return load_config(None, [f"train.output_dir={tmp_path / 'outputs'}", "train.run_name=unit", *overrides])

    return make


def steps_of(client, run_id, key):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_run_is_created_with_config_params_then_resumed(make_cfg):
    cfg = make_cfg("lora.targets=[to_q, to_k]")  # a list-valued param too
    run_dir = Path(cfg.run_dir).resolve()
    assert tracking_uri(cfg) == f"sqlite:///{run_dir}/mlflow.db"

    run = MlflowRun.start_or_resume(cfg)
    client = MlflowClient(tracking_uri(cfg))
    info = client.get_run(run.run_id)
    assert info.info.run_name == "unit"
    assert info.data.params == {k: str(v) for k, v in flatten(cfg).items()}
    assert (run_dir / RUN_ID_FILE).read_text().strip() == run.run_id
    assert info.info.artifact_uri.startswith((run_dir / "mlartifacts").as_uri())
    run.log_metrics({"loss": 1.0}, step=0)
    run.log_metrics({"loss": 0.5}, step=1)
    run.end("FAILED")  # e.g. the job died

    # A restart (even with a changed config) appends to the same run; params stay as first logged.
    resumed = MlflowRun.start_or_resume(make_cfg("train.steps=7"))
    assert resumed.run_id == run.run_id
    assert client.get_run(run.run_id).info.status == "RUNNING"
    resumed.log_metrics({"loss": 0.25}, step=2)
    resumed.log_metrics({"loss": 0.125}, step=3)
    assert steps_of(client, run.run_id, "loss") == [0, 1, 2, 3]
    assert client.get_run(run.run_id).data.params["train.steps"] == str(cfg.train.steps)
    assert len(client.search_runs([info.info.experiment_id])) == 1
    resumed.end()
    assert client.get_run(run.run_id).info.status == "FINISHED"


def test_stale_run_id_file_starts_a_new_run(make_cfg):
    cfg = make_cfg()
    Path(cfg.run_dir).mkdir(parents=True)
    (Path(cfg.run_dir) / RUN_ID_FILE).write_text("0123456789abcdef0123456789abcdef\n")
    run = MlflowRun.start_or_resume(cfg)
    assert run.run_id != "0123456789abcdef0123456789abcdef"
    assert (Path(cfg.run_dir) / RUN_ID_FILE).read_text().strip() == run.run_id


def test_tracking_uri_precedence(make_cfg, tmp_path, monkeypatch):
    from_cfg = f"sqlite:///{tmp_path}/from_cfg.db"
    cfg = make_cfg(f"tracking.tracking_uri={from_cfg}")
    assert tracking_uri(cfg) == from_cfg

    from_env = f"sqlite:///{tmp_path}/from_env.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", from_env)
    assert tracking_uri(cfg) == from_env
    run = MlflowRun.start_or_resume(cfg)
    assert run.tracking_uri == from_env
    assert MlflowClient(from_env).get_run(run.run_id).info.run_name == "unit"
    assert (tmp_path / "from_env.db").is_file()
    assert not (tmp_path / "from_cfg.db").exists()
    assert not (Path(cfg.run_dir) / "mlflow.db").exists()


def test_attach_from_another_process_logs_to_the_same_run(make_cfg):
    cfg = make_cfg()
    run = MlflowRun.start_or_resume(cfg)
    run.log_metrics({"loss": 1.0}, step=0)
    child = textwrap.dedent(
        f"""
        from dopsd_ray.tracking import MlflowRun
        run = MlflowRun.attach({run.tracking_uri!r}, {run.run_id!r})
        run.log_metrics({{"loss": 0.5, "from_child": 1.0}}, step=1)
        run.set_tag("written_by", "child")
        """
    )
    subprocess.run([sys.executable, "-c", child], check=True, cwd=REPO, timeout=120)
    client = MlflowClient(run.tracking_uri)
    assert steps_of(client, run.run_id, "loss") == [0, 1]
    assert steps_of(client, run.run_id, "from_child") == [1]
    assert client.get_run(run.run_id).data.tags["written_by"] == "child"

    # Shipped to a Ray worker, a handle travels as (tracking_uri, run_id).
    copy = pickle.loads(pickle.dumps(run))
    assert (copy.tracking_uri, copy.run_id) == (run.tracking_uri, run.run_id)
    with pytest.raises(Exception):
        MlflowRun.attach(run.tracking_uri, "0123456789abcdef0123456789abcdef")


def test_grid_image_and_artifacts_round_trip(make_cfg, tmp_path):
    run = MlflowRun.start_or_resume(make_cfg())
    student = [torch.rand(3, 32, 32) * 2 - 1 for _ in range(3)]
    teacher = [torch.rand(3, 32, 32) * 2 - 1, None, tensor_to_pil(torch.zeros(3, 32, 32))]
    grid = sample_grid([student, teacher], ["student", "teacher context"], ["a red cube", "a blue sphere", "step 4"])
    assert isinstance(grid, Image.Image)
    assert grid.width > 3 * MIN_CELL and grid.height > 2 * MIN_CELL  # 32 px cells upscaled to 128

    run.log_image(grid, "samples/step_000010.png")
    run.log_text("a red cube\na blue sphere\n", "samples/prompts.txt")
    export = tmp_path / "adapter.safetensors"
    export.write_bytes(b"weights")
    run.log_artifact(export, "export")

    client = MlflowClient(run.tracking_uri)
    got = Path(client.download_artifacts(run.run_id, "samples/step_000010.png", str(tmp_path / "dl")))
    with Image.open(got) as im:
        assert im.size == grid.size
        assert im.convert("RGB").tobytes() == grid.tobytes()
    names = {a.path for a in client.list_artifacts(run.run_id, "export")}
    assert names == {"export/adapter.safetensors"}
    assert "samples/prompts.txt" in {a.path for a in client.list_artifacts(run.run_id, "samples")}


def test_non_finite_metrics_are_skipped_and_counted(make_cfg):
    run = MlflowRun.start_or_resume(make_cfg())
    client = MlflowClient(run.tracking_uri)
    run.log_metrics({"loss": math.nan, "grad_norm": math.inf, "lr": 1e-4}, step=5)
    run.log_metrics({"loss": torch.tensor(-math.inf)}, step=6)
    assert client.get_metric_history(run.run_id, "loss") == []
    assert steps_of(client, run.run_id, "lr") == [5]
    assert [m.value for m in client.get_metric_history(run.run_id, NONFINITE_METRIC)] == [2.0, 3.0]
    # The count is per run, so a fresh handle (a restarted learner) carries on from it.
    MlflowRun.attach(run.tracking_uri, run.run_id).log_metrics({"loss": math.nan, "ok": 1}, step=7)
    assert client.get_run(run.run_id).data.metrics[NONFINITE_METRIC] == 4.0


def test_sinks_satisfy_the_protocol():
    sink = ListSink()
    assert isinstance(sink, MetricSink)
    assert issubclass(MlflowRun, MetricSink)
    sink.log_metrics({"loss": 1.0}, step=3)
    assert sink.metrics == [(3, {"loss": 1.0})]


def test_grid_layout_and_conversion():
    assert tensor_to_pil(torch.tensor([-1.0, 0.0, 1.0]).view(3, 1, 1)).getpixel((0, 0)) == (0, 128, 255)
    assert tensor_to_pil(torch.zeros(1, 3, 4, 5)).size == (5, 4)
    # One 32x48 image: a cell of 128x192 (integer upscale 4), padding all round, no labels.
    grid = sample_grid([[torch.zeros(3, 32, 48)]])
    assert grid.size == (2 * PAD + 192, 2 * PAD + 128)
    with pytest.raises(ValueError, match="same number"):
        sample_grid([[torch.zeros(3, 8, 8)], [torch.zeros(3, 8, 8)] * 2])
    with pytest.raises(ValueError, match="column labels"):
        sample_grid([[torch.zeros(3, 8, 8)]], col_labels=["a", "b"])
