"""Several nodes, and nodes lost: a real multi-node Ray on this machine (tests/cluster.py).

Each node is its own raylet with its own object store; the head runs the driver (this
process) and has no CPUs; learner and rollout nodes are told apart by custom resources that
runtime.learner_resources / runtime.rollout_resources ask for; train.output_dir is the
storage every node shares. Nodes are removed at once, processes and object store with them
(allow_graceful=False), the way spot preemption takes a machine.

    object store, a rollout node lost -> the worker comes back on the replacement node, counted
    collective transport              -> snapshots and experiences cross nodes
    a rollout node lost, none left    -> the run fails within runtime.replacement_timeout_s,
                                         naming the missing resources
    a learner node lost               -> Ray Train restarts the learner on a replacement node from
                                         the newest checkpoint in shared storage, exactly as if
                                         uninterrupted
"""

import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from cluster import LEARNER, ROLLOUT
from dopsd_ray.checkpoint import checkpoint_dir_name
from dopsd_ray.recipes import load_config
from dopsd_ray.driver import train
from dopsd_ray.nodes import RolloutWorkersLost
from test_reliability import metric_steps, registered_checkpoint_step

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"

pytestmark = pytest.mark.slow

ON_NODES = ["runtime.learner_resources={CPU: 1, learner_node: 1}", "runtime.rollout_resources={CPU: 1, rollout_node: 1}"]
DISAGGREGATED = ["runtime.mode=disaggregated", "runtime.num_rollout_workers=1", "runtime.max_staleness=0",
                 "runtime.debug_check_sync=true"]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The cluster's shared storage (train.output_dir): checkpoints, MLflow, exports."""
    return tmp_path_factory.mktemp("shared_storage")


@pytest.fixture
def cluster(ray_cluster):
    """The module's cluster, left with its head alone after each test."""
    yield ray_cluster
    ray_cluster.remove_all()


def config(shared, name, *overrides, steps):
    return load_config(TINY, [f"train.output_dir={shared}", f"train.run_name={name}", f"train.steps={steps}",
                              "train.sample_every=1000", "train.checkpoint_every=2", "runtime.sync_timeout_s=120",
                              "runtime.max_failures=0", f"tracking.tracking_uri=sqlite:///{shared}/mlflow.db",
                              *ON_NODES, *overrides])


def history(summary, key):
    """[(step, value)] of `key` in the run's MLflow store, in logging order."""
    client = MlflowClient(summary["mlflow_tracking_uri"])
    metrics = client.get_metric_history(summary["mlflow_run_id"], key)
    return [(m.step, m.value) for m in sorted(metrics, key=lambda m: m.timestamp)]


class Running(threading.Thread):
    """train(cfg) in a thread, so that this (the main) thread can add and remove nodes meanwhile
    (Ray starts a node's processes from the main thread only)."""

    def __init__(self, cfg):
        super().__init__(daemon=True)
        self.cfg, self.summary, self.error = cfg, None, None
        self.start()

    def run(self):
        try:
            self.summary = train(self.cfg)
        except BaseException as err:  # re-raised by result()
            self.error = err

    def result(self, timeout_s: float = 600):
        self.join(timeout_s)
        assert not self.is_alive(), f"the run did not end within {timeout_s} s"
        if self.error is not None:
            raise self.error
        return self.summary


def wait_until(ready, timeout_s: float = 300, poll_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert time.monotonic() < deadline, "the run did not get there in time"
        time.sleep(poll_s)


def logged_step(shared, name, at_least):
    def ready():
        steps = [s for s, _ in metric_steps(shared, name, "loss")]
        return bool(steps) and max(steps) >= at_least
    return ready


def test_object_store_across_nodes_survives_a_lost_rollout_node(cluster, shared):
    """Learner on the learner node, the rollout worker on the rollout node, the driver and its
    queues on the head: snapshots and experiences cross object stores. After step 2 the rollout
    node is taken away; a replacement comes up (as an autoscaler would start one) and Ray
    starts the worker there; the run completes, the restart is counted, and every experience
    trained on was made with exactly the learner's snapshot of its version (debug_check_sync)."""
    learner_node, first = cluster.add(LEARNER), cluster.add(ROLLOUT)
    name, steps = "rollout-node-lost", 6

    start = time.monotonic()
    run = Running(config(shared, name, *DISAGGREGATED, "runtime.replacement_timeout_s=100", steps=steps))
    wait_until(logged_step(shared, name, 2))
    cluster.remove(first)
    time.sleep(2)  # the worker waits, unplaceable, until a node with rollout_node joins
    replacement = cluster.add(ROLLOUT)
    summary = run.result()

    nodes = {cluster.head_id, learner_node, first, replacement}
    assert len(nodes) == 4
    assert summary["learner_node"] == learner_node
    worker = summary["rollout_workers"][0]
    assert worker["node_id"] == replacement and worker["restarted"] is True and worker["version"] == steps
    assert [s for s, _ in history(summary, "loss")] == list(range(1, steps + 1))
    assert history(summary, "count/rollout_restarts")[-1] == (steps, 1.0)
    assert all(v == 0 for _, v in history(summary, "staleness"))
    assert history(summary, "count/sync_checked")[-1] == (steps, float(steps))  # every trained experience
    dropped = history(summary, "count/dropped_stale")[-1][1]
    client = MlflowClient(summary["mlflow_tracking_uri"])
    assert client.get_run(summary["mlflow_run_id"]).info.status == "FINISHED"
    print(f"\nrollout node lost after step 2 and replaced; restarts 1, dropped {dropped:g}; "
          f"{time.monotonic() - start:.0f} s")


def test_collective_transport_across_nodes(cluster, shared):
    """runtime.sync_transport=collective: learner rank 0 broadcasts each snapshot to the worker
    on the other node (gloo here, NCCL on GPUs); experiences come back through the queue on the
    head. Every experience trained on was made with the broadcast snapshot of its version."""
    learner_node, rollout_node = cluster.add(LEARNER), cluster.add(ROLLOUT)
    steps = 3
    summary = train(config(shared, "collective-nodes", *DISAGGREGATED, "runtime.sync_transport=collective",
                           steps=steps))
    assert len({cluster.head_id, learner_node, rollout_node}) == 3
    assert summary["learner_node"] == learner_node
    worker = summary["rollout_workers"][0]
    assert worker["node_id"] == rollout_node and worker["version"] == steps and worker["sync_bytes"] > 0
    assert history(summary, "count/sync_checked")[-1] == (steps, float(steps))
    assert all(v == 0 for _, v in history(summary, "staleness"))


def test_a_rollout_node_lost_with_none_to_replace_it_fails_the_run_naming_the_resources(cluster, shared):
    """No rollout-type node is left and none joins: the run fails within
    runtime.replacement_timeout_s of the loss (plus a poll), with an error naming the resource
    no node has; the learners stop cleanly (no Ray Train retry) and the MLflow run is FAILED."""
    cluster.add(LEARNER)
    rollout_node = cluster.add(ROLLOUT)
    name, timeout_s = "rollout-node-gone", 10
    run = Running(config(shared, name, *DISAGGREGATED, f"runtime.replacement_timeout_s={timeout_s}",
                         "runtime.max_failures=1", steps=20))
    wait_until(logged_step(shared, name, 1))
    cluster.remove(rollout_node)
    lost_at = time.monotonic()
    with pytest.raises(RolloutWorkersLost) as err:
        run.result()
    failed_after = time.monotonic() - lost_at
    message = str(err.value)
    assert "rollout worker 0" in message and f"runtime.replacement_timeout_s={timeout_s}" in message
    assert "no alive node has {'rollout_node': 1.0}" in message and "runtime.rollout_resources" in message
    assert failed_after < timeout_s + 20, failed_after  # the grace of stop_workers is not waited for
    run_id = (shared / name / "mlflow_run_id.txt").read_text().strip()
    client = MlflowClient(f"sqlite:///{shared}/mlflow.db")
    stopped = client.get_run(run_id)
    assert stopped.info.status == "FAILED" and "rollout workers were lost" in stopped.data.tags["dopsd.stopped"]
    assert not client.get_metric_history(run_id, "learner/resumed_from_step")  # not retried
    print(f"\nrun failed {failed_after:.1f} s after the rollout node was lost: {message}")


def test_a_lost_learner_node_resumes_on_a_replacement_exactly_as_if_uninterrupted(cluster, shared):
    """Colocated (every noise draw seeded), checkpoints every 2 steps into the shared storage.
    Once Ray Train has registered one, the learner node is taken away and a replacement joins:
    Ray Train (runtime.max_failures=1) starts the learner group there, which resumes from the
    newest complete checkpoint in shared storage. The steps after it log the same lr, loss and
    grad norm as a run that was never interrupted, and the final checkpoints hold equal
    student, EMA-teacher (fp32: the teacher file is the EMA itself) and optimizer tensors."""
    first = cluster.add(LEARNER)
    steps = 8
    reference = train(config(shared, "learner-reference", steps=steps))
    name = "learner-node-lost"
    run = Running(config(shared, name, "runtime.max_failures=1", steps=steps))
    experiment = shared / name / "ray_train" / name
    wait_until(lambda: (registered_checkpoint_step(experiment) or 0) >= 2)
    cluster.remove(first)
    replacement = cluster.add(LEARNER)
    summary = run.result()

    assert summary["learner_node"] == replacement
    assert str(summary["checkpoint"]).startswith(str(shared))  # Ray Train's storage: the shared dir
    resumed = history(summary, "learner/resumed_from_step")
    assert len(resumed) == 1 and resumed[0][1] in (2.0, 4.0, 6.0), resumed
    at = int(resumed[0][1])
    for key in ("lr", "loss", "loss/dopsd", "grad_norm", "count/skipped_nonfinite"):
        want = [(s, v) for s, v in history(reference, key) if s > at]
        assert history(summary, key)[-len(want):] == want, key
    final = checkpoint_dir_name(steps)
    mine, theirs = Path(summary["checkpoint"]), Path(reference["checkpoint"])
    assert mine.name == theirs.name == final
    for f in ("student.safetensors", "teacher.safetensors", "optimizer_rank0.safetensors"):
        got, want = load_file(str(mine / f)), load_file(str(theirs / f))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), f
    client = MlflowClient(summary["mlflow_tracking_uri"])
    assert client.get_run(summary["mlflow_run_id"]).info.status == "FINISHED"
    print(f"\nlearner node lost after the step-{at} checkpoint; resumed on the replacement node, "
          f"final checkpoint equal to the uninterrupted run's")
