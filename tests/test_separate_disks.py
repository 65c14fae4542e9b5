"""A cluster whose nodes share no disk, as on AWS: every worker node runs in a mount namespace
of its own (tests/cluster.py NodeCluster.add_own_disk) with an empty private tmpfs over this
test session's folders and the node cache, so no node sees a file another wrote there. The
head (the driver, this process) keeps its own disk. Runs keep their files in an S3-protocol
server on loopback (moto, a process of its own: tests/conftest.py `s3`), reached by the same
code as AWS; tracking is the driver's own `mlflow server` (tracking_server.py), set up by
nobody.

    (a) a disaggregated run on s3:// completes; every file it writes is in the bucket, and the
        MLflow run (metrics from learner rank 0 on another node, artifacts) reads from the head
    (b) the learner node lost after a checkpoint, a fresh node (empty disk) joins: the run
        resumes from the bucket and ends bitwise equal to an uninterrupted run
    (c) a local train.output_dir no worker node sees: refused in one line naming the node
    (e) a registered checkpoint that cannot be read: the run fails naming it, never step 0
"""

import importlib.util
import json
import os
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load

from cluster import LEARNER, ROLLOUT
from dopsd_ray.checkpoint import checkpoint_dir_name
from dopsd_ray.config import ConfigError
from dopsd_ray.recipes import load_config
from dopsd_ray.storage import Storage

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
ON_NODES = ["runtime.learner_resources={CPU: 1, learner_node: 1}", "runtime.rollout_resources={CPU: 1, rollout_node: 1}"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def disks(ray_cluster, s3, tmp_path_factory):
    """(cluster, hidden): `hidden` are the folders each worker node gets a private empty tmpfs over."""
    cache = Path(os.environ.get("DOPSD_CACHE", "/tmp/dopsd-cache"))
    return ray_cluster, [tmp_path_factory.getbasetemp(), cache]


@pytest.fixture
def cluster(disks, s3):
    ray_cluster, hidden = disks

    def add(kind):
        return ray_cluster.add_own_disk(kind, hidden, env={**s3.env, "PYTHONPATH": str(ROOT)})
    ray_cluster.add_node = add
    yield ray_cluster
    ray_cluster.remove_all()


def config(output_dir, name, *overrides, steps):
    return load_config(TINY, [f"train.output_dir={output_dir}", f"train.run_name={name}", f"train.steps={steps}",
                              "runtime.sync_timeout_s=120", "runtime.max_failures=0", *ON_NODES, *overrides])


def test_a_local_output_dir_that_a_node_cannot_see_is_refused_in_one_line_before_any_weights(cluster, tmp_path):
    cluster.add_node(LEARNER)
    from dopsd_ray.driver import train

    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        train(config(tmp_path / "outputs", "local-out", steps=2))
    message = str(err.value)
    assert "\n" not in message and f"train.output_dir={str(tmp_path / 'outputs')!r}" in message
    assert "learner_node" in message and "does not see it" in message and "s3://" in message
    assert not (tmp_path / "outputs" / "local-out" / "tiny_model").exists()  # no model built, no weights loaded
    print(f"\nrefused in {time.monotonic() - start:.1f} s: {message}")


def test_a_disaggregated_run_on_object_storage_keeps_every_file_in_the_bucket(cluster, s3, capsys):
    """Every file a run writes, found in the bucket and readable from the head: config.yaml, the
    run-id file, summary.json, checkpoints, export/ and export/step_N/, the sample grids, the
    evaluation's results, the context cache; the MLflow run's metrics (logged by learner rank 0 on
    the learner node through the driver's tracking server) and artifacts."""
    spec = importlib.util.spec_from_file_location("train_job", ROOT / "jobs" / "train.py")
    train_job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_job)

    learner, rollout = cluster.add_node(LEARNER), cluster.add_node(ROLLOUT)
    out, name, steps = s3.uri("runs"), "on-s3", 4
    argv = ["--config", str(TINY), f"train.output_dir={out}", f"train.run_name={name}", f"train.steps={steps}",
            "train.checkpoint_every=2", "train.sample_every=2", "train.export_every=2", "eval.at_end=true",
            "data.cache_contexts=true", "runtime.mode=disaggregated", "runtime.num_rollout_workers=1",
            "runtime.max_staleness=0", "runtime.max_failures=0", *ON_NODES]
    start = time.monotonic()
    assert train_job.main(argv) == 0
    seconds = time.monotonic() - start
    printed = capsys.readouterr().out
    run = Storage(f"{out}/{name}")
    listing = sorted(run.listdir())
    expected = {"config.yaml", "config.resolved.json", "mlflow_run_id.txt", "summary.json", "ray_train", "export",
                "samples", "eval", "context_cache", "tiny_model", "mlartifacts", "mlflow.db"}
    assert expected <= set(listing), listing
    experiment = run.child("ray_train", name)
    assert {checkpoint_dir_name(2), checkpoint_dir_name(4)} <= set(experiment.listdir())
    assert {"pytorch_lora_weights.safetensors", "step_000002", "step_000004"} <= set(run.listdir("export"))
    assert "pytorch_lora_weights.safetensors" in run.listdir("export/step_000002")
    assert {"step_000000.png", "step_000002.png", "step_000004.png"} <= set(run.listdir("samples"))
    assert {"results.json", "table.md"} <= set(run.listdir("eval"))
    assert run.listdir("context_cache/student") and run.listdir("context_cache/teacher")
    summary = json.loads(run.read_text("summary.json"))
    assert summary["run_dir"] == run.uri and summary["checkpoint"] == experiment.name_uri(checkpoint_dir_name(steps))
    assert summary["learner_node"] == learner and summary["rollout_workers"][0]["node_id"] == rollout
    lora = load(run.read_bytes("export/pytorch_lora_weights.safetensors"))
    assert lora and all(torch.isfinite(v).all() for v in lora.values())

    # the MLflow store: on the driver's disk, copied to the bucket; artifacts in the bucket
    client = MlflowClient(summary["mlflow_tracking_uri"])
    run_id = summary["mlflow_run_id"]
    assert run.read_text("mlflow_run_id.txt").strip() == run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(1, steps + 1))
    assert [m.step for m in client.get_metric_history(run_id, f"eval/{name}/sharpness")] == [steps]
    artifacts = Storage(run.name_uri("mlartifacts"))
    found = set()

    def walk(store, prefix=""):
        for entry in store.listdir(prefix):
            path = f"{prefix}/{entry}".lstrip("/")
            if store.is_file(path):
                found.add(path.split("/artifacts/", 1)[-1])
            else:
                walk(store, path)
    walk(artifacts)
    assert {"config.yaml", "samples/step_000002.png", "export/pytorch_lora_weights.safetensors",
            "eval/results.json"} <= found, sorted(found)
    assert "MLflow: serving" in printed and summary["mlflow_ui"] in printed
    print(f"\non s3 with separate disks: {seconds:.0f} s; run files {listing}")


def test_a_lost_learner_node_resumes_from_the_bucket_on_a_fresh_node_exactly(cluster, s3):
    """Colocated, checkpoints every 2 steps into the bucket. Once Ray Train has registered one,
    the learner node is taken away with its disk and a fresh node joins: Ray Train starts the
    learner there, which copies the model and the checkpoint from the bucket and resumes. The
    final student, EMA teacher and optimizer state equal an uninterrupted run's, bitwise."""
    from dopsd_ray.driver import train
    from test_nodes import Running, wait_until
    from test_reliability import registered_checkpoint_step

    first = cluster.add_node(LEARNER)
    out, steps = s3.uri("resume"), 20  # about 10 s of steps: the node goes well before the end
    reference = train(config(out, "reference", "train.checkpoint_every=2", "train.sample_every=1000", steps=steps))
    name = "learner-lost"
    run = Running(config(out, name, "train.checkpoint_every=2", "train.sample_every=1000", "runtime.max_failures=1",
                         steps=steps))
    experiment = Storage(f"{out}/{name}/ray_train/{name}")
    wait_until(lambda: (registered_checkpoint_step(experiment) or 0) >= 2, timeout_s=300, poll_s=0.05)
    cluster.remove(first)
    replacement = cluster.add_node(LEARNER)
    summary = run.result()

    assert summary["learner_node"] == replacement and summary["checkpoint"].startswith(out)
    client = MlflowClient(summary["mlflow_tracking_uri"])
    resumed = client.get_metric_history(summary["mlflow_run_id"], "learner/resumed_from_step")
    assert len(resumed) == 1 and 2 <= resumed[0].value < steps, resumed
    mine, theirs = Storage(summary["checkpoint"]), Storage(reference["checkpoint"])
    for f in ("student.safetensors", "teacher.safetensors", "optimizer_rank0.safetensors", "ema_rank0.safetensors"):
        if not theirs.is_file(f):
            continue
        got, want = load(mine.read_bytes(f)), load(theirs.read_bytes(f))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), f
    print(f"\nlearner node lost after the step-{resumed[0].value:g} checkpoint; resumed from the bucket on a "
          "fresh node; final checkpoint bitwise equal to the uninterrupted run's")


def test_a_registered_checkpoint_that_cannot_be_read_fails_the_run_naming_it(cluster, s3):
    """A run stopped after its step-2 checkpoint, whose student file is then lost from the bucket:
    the relaunch fails naming that checkpoint, instead of training again from step 0."""
    from dopsd_ray.driver import train

    cluster.add_node(LEARNER)
    out, name = s3.uri("unreadable"), "damaged"
    first = train(config(out, name, "train.checkpoint_every=2", "train.sample_every=1000", steps=2))
    checkpoint = Storage(first["checkpoint"])
    checkpoint.remove("student.safetensors")
    with pytest.raises(Exception) as err:
        train(config(out, name, "train.checkpoint_every=2", "train.sample_every=1000", steps=4))
    assert f"cannot resume: the registered checkpoint is not readable: {checkpoint.uri}: student.safetensors is " \
           "missing" in str(err.value)
    client = MlflowClient(first["mlflow_tracking_uri"])
    assert [m.step for m in client.get_metric_history(first["mlflow_run_id"], "loss")] == [1, 2]  # nothing again
