"""Faults injected for real: killed processes, interrupted checkpoint writes, numbers that blow up.

No mocks: a real local Ray, Ray Train + DeepSpeed, MLflow, tiny models. Processes are
killed from outside with SIGKILL (as an OOM killer would), and only processes that
descend from this test process, so nothing else on the machine is touched.

    rollout worker killed mid-run  -> restarted, re-fetches the snapshot, run completes, counted
    learner killed later that run  -> Ray Train restarts it from the last checkpoint, same MLflow run
    re-run whose steps blow up     -> skipped + counted, stops after N, last checkpoint usable
    checkpoint writer killed       -> the last complete checkpoint is the one loaded
    non-finite gradients           -> the optimizer step is skipped (real DeepSpeed engines)
    unpickling                     -> nowhere in the code
"""

import json
import math
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient
from ray.train import Checkpoint
from safetensors.torch import load_file

from dopsd_ray.checkpoint import (
    CheckpointUnreadable, check_checkpoint, checkpoint_dir_name, latest_checkpoint, load_checkpoint, upload_checkpoint,
    usable_checkpoint, write_checkpoint_files,
)
from dopsd_ray.algorithms.steps import Experience
from dopsd_ray.recipes import load_config
from dopsd_ray.driver import train
from dopsd_ray.families import pipeline_class
from dopsd_ray.learner import ExperienceQueue
from dopsd_ray.storage import Storage
from dopsd_ray.weights import FullWeights

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


pytestmark = pytest.mark.usefixtures("local_ray")


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("faults")


FLUX = ["model.family=flux2_klein", "model.max_sequence_length=160", "algorithm.training_sigmas=inference"]


def config(out, name, *overrides, steps):
    # one MLflow store for the module: each new store costs seconds of schema migrations
    return load_config(TINY, [f"train.output_dir={out}", f"train.run_name={name}", f"train.steps={steps}",
                              "train.sample_every=1000", "train.checkpoint_every=2", "runtime.sync_timeout_s=120",
                              f"tracking.tracking_uri=sqlite:///{out}/mlflow.db", *overrides])


def history(client, run_id, key):
    """[(step, value)] in the order they were logged."""
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)]


def our_processes(title: str) -> list[psutil.Process]:
    """Processes under this test process whose title starts with `title` (e.g. "ray::RolloutWorker")."""
    found = []
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if " ".join(p.cmdline()).startswith(title):
                found.append(p)
        except psutil.Error:
            continue
    return found


class Killer(threading.Thread):
    """Waits until `ready()` returns something, then SIGKILLs the first of the `count` processes
    titled `title` (it waits until there are exactly that many)."""

    def __init__(self, title: str, ready, timeout_s: float = 400, count: int = 1):
        super().__init__(daemon=True)
        self.title, self.ready, self.timeout_s, self.count = title, ready, timeout_s, count
        self.killed_pid, self.seen, self.error = None, None, None
        self.done = threading.Event()

    def run(self):
        deadline = time.monotonic() + self.timeout_s
        try:
            while not self.done.is_set() and time.monotonic() < deadline:
                seen = self.ready()
                targets = our_processes(self.title) if seen is not None else []
                if len(targets) == self.count:
                    os.kill(targets[0].pid, signal.SIGKILL)
                    self.seen, self.killed_pid = seen, targets[0].pid
                    return
                time.sleep(0.1)
        except Exception as err:  # surfaced by the test
            self.error = err

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.join()


def metric_steps(out: Path, name: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of `key` logged so far in run `name` (empty until the run exists)."""
    id_file = out / name / "mlflow_run_id.txt"
    if not id_file.is_file():
        return []
    try:
        history = MlflowClient(f"sqlite:///{out}/mlflow.db").get_metric_history(id_file.read_text().strip(), key)
    except Exception:  # the store is busy
        return []
    return [(m.step, m.value) for m in history]


def registered_checkpoint_step(experiment_dir: Path | Storage):
    """The step of the newest checkpoint Ray Train has registered, or None (a folder or a Storage)."""
    store = experiment_dir if isinstance(experiment_dir, Storage) else Storage(experiment_dir)
    try:
        snapshot = json.loads(store.read_text("checkpoint_manager_snapshot.json"))
        return snapshot["latest_checkpoint_result"]["metrics"]["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


# -- 1. a rollout worker dies, then 2. the learner dies: one run ------------------------------
RUN = "flux-async-sft-faults"
STEPS = 10


@pytest.fixture(scope="module")
def faults_run(out):
    """FLUX.2-klein, baseline SFT, async (max_staleness 1), one rollout worker, checkpoints
    every 2 steps, runtime.max_failures=1. Two processes are SIGKILLed during the run:
      1. the rollout worker, once the learner has logged step 2;
      2. then the learner, once the worker's restart is counted and a checkpoint taken
         after that has been registered by Ray Train.
    (This run is also the async-SFT-on-FLUX.2-klein test.)"""
    cfg = config(out, RUN, *FLUX, "algorithm.name=sft", "runtime.mode=disaggregated",
                 "runtime.num_rollout_workers=1", "runtime.max_staleness=1", "runtime.debug_check_sync=true",
                 "runtime.max_failures=1", steps=STEPS)
    experiment_dir = out / RUN / "ray_train" / RUN

    def after_step_2():
        steps = [s for s, _ in metric_steps(out, RUN, "loss")]
        return max(steps) if steps and max(steps) >= 2 else None

    def after_restart_checkpointed():
        if rollout.killed_pid is None:
            return None
        counted = [s for s, v in metric_steps(out, RUN, "count/rollout_restarts") if v >= 1]
        registered = registered_checkpoint_step(experiment_dir)
        return registered if counted and registered is not None and registered >= min(counted) else None

    with Killer("ray::RolloutWorker", after_step_2) as rollout, \
            Killer("ray::RayTrainWorker", after_restart_checkpointed) as learner:
        summary = train(cfg)
    return summary, rollout, learner


@pytest.mark.slow  # the FLUX.2-klein fault run (faults_run): ~2.5 min on 2 cores
def test_flux2_klein_async_sft_survives_a_killed_rollout_worker(faults_run):
    """Ray restarts the worker and retries its roll-out loop; the new process fetches the latest
    snapshot from the WeightStore; the restart is counted in MLflow; the run completes."""
    summary, rollout, _ = faults_run
    assert rollout.error is None and rollout.killed_pid is not None, "the rollout worker was not killed"
    # the old process had snapshots up to version `seen`; a step two later takes only newer ones
    # (max_staleness 1): only the new process can make them
    assert rollout.seen <= STEPS - 3, f"killed after step {rollout.seen}: too late to prove anything"

    client = MlflowClient(summary["mlflow_tracking_uri"])
    run_id = summary["mlflow_run_id"]
    assert history(client, run_id, "count/rollout_restarts")[-1] == (STEPS, 1.0)
    assert summary["rollout_restarts"] == 1
    assert {s for s, _ in history(client, run_id, "loss/sft")} == set(range(1, STEPS + 1))
    assert all(0 <= v <= 1 for _, v in history(client, run_id, "staleness"))
    # every experience trained on whose version this learner process published (all but a few
    # around the learner restart) was made with exactly that snapshot: the new worker fetched it
    assert history(client, run_id, "count/sync_checked")[-1][1] >= STEPS // 2
    worker = summary["rollout_workers"][0]
    assert worker.get("restarted") is True and worker["version"] >= STEPS - 1 and worker["snapshots"] >= 1
    assert client.get_run(run_id).info.status == "FINISHED"
    print(f"\nrollout worker pid {rollout.killed_pid} killed after step {rollout.seen}; restarts counted: "
          f"{summary['rollout_restarts']}; fit {summary['seconds']:.0f} s")


@pytest.mark.slow  # the FLUX.2-klein fault run (faults_run): ~2.5 min on 2 cores
def test_flux2_klein_async_sft_resumes_from_the_last_checkpoint_after_a_killed_learner(faults_run, out):
    """Ray Train restarts the learner group from the last registered checkpoint (FailureConfig);
    the step count continues from there, in the same MLflow run; the export loads."""
    summary, _, learner = faults_run
    assert learner.error is None and learner.killed_pid is not None, "the learner was not killed"
    client = MlflowClient(summary["mlflow_tracking_uri"])
    run_id = summary["mlflow_run_id"]

    resumed = client.get_metric_history(run_id, "learner/resumed_from_step")
    assert len(resumed) == 1, resumed
    resumed_at, restarted_ms = int(resumed[0].value), resumed[0].timestamp
    assert resumed_at >= learner.seen and resumed_at % 2 == 0 and resumed_at < STEPS
    # steps 1..k before the kill (k >= resumed_at), then resumed_at + 1 .. STEPS
    losses = sorted(client.get_metric_history(run_id, "loss/sft"), key=lambda m: m.timestamp)
    before = [m.step for m in losses if m.timestamp < restarted_ms]
    after = [m.step for m in losses if m.timestamp >= restarted_ms]
    assert before == list(range(1, len(before) + 1)) and len(before) >= resumed_at
    assert after == list(range(resumed_at + 1, STEPS + 1))
    assert summary["final_metrics"]["step"] == STEPS

    runs = client.search_runs([client.get_run(run_id).info.experiment_id], f"attributes.run_name = '{RUN}'")
    assert [r.info.run_id for r in runs] == [run_id]  # one MLflow run, before and after the restart
    assert client.get_run(run_id).info.status == "FINISHED"

    lora = load_file(str(Path(summary["export"]) / "pytorch_lora_weights.safetensors"))
    assert lora and all(torch.isfinite(v).all() for v in lora.values())
    pipe = pipeline_class("flux2_klein").from_pretrained(str(out / RUN / "tiny_model"))
    pipe.load_lora_weights(summary["export"])  # the final export loads into the stock pipeline
    assert check_checkpoint(summary["checkpoint"]) is None
    print(f"\nlearner pid {learner.killed_pid} killed with the step-{learner.seen} checkpoint registered; resumed "
          f"at step {resumed_at}; steps logged {before} then {after}; one MLflow run {run_id}")


def test_a_restarted_learner_never_trains_on_a_dead_learners_snapshots(out):
    """After a restart the new learner re-uses step numbers the dead one published; its own
    generation tells its snapshots apart: an experience made with the dead learner's weights
    is dropped (and counted) whatever its version, one of its own within max_staleness is
    trained on. The learner's real source reading a real queue."""
    cfg = config(out, "generations", "runtime.mode=disaggregated", "runtime.max_staleness=1", steps=1)
    experiences = queue.Queue()
    source = ExperienceQueue(experiences).open(cfg, 0, torch.device("cpu"), None, None, 6, generation=2,
                                               counters={})  # what setup() passes at step 6, generation 2
    made = [(6, 1), (5, 1), (7, 2), (4, 2), (6, 2), (5, 2)]  # (version, generation); generation 1 is dead
    for version, generation in made:
        experiences.put(Experience([f"{version}/{generation}"], version, "sft", None, generation=generation))
    assert [(f.item.ids, f.dropped) for f in (source.fetch(6), source.fetch(6))] == [(["6/2"], 4), (["5/2"], 0)]


# -- a rollout worker dies under the collective transport -------------------------------------
@pytest.mark.slow
def test_a_killed_rollout_worker_rejoins_the_collective_weight_sync(out):
    """runtime.sync_transport=collective, two rollout workers, async: one worker is SIGKILLed
    after step 2. Ray restarts it; at the next sync learner rank 0 finds it outside the group,
    sets up a new group with both workers and broadcasts; the run completes. debug_check_sync
    makes any experience trained on with weights other than its version's snapshot fatal.
    (About a minute and a half on 2 cores, hence slow.)"""
    name, steps = "collective-worker-killed", 8
    cfg = config(out, name, "runtime.mode=disaggregated", "runtime.num_rollout_workers=2",
                 "runtime.max_staleness=1", "runtime.sync_transport=collective", "runtime.debug_check_sync=true",
                 "train.checkpoint_every=1000", steps=steps)

    def after_step_2():
        logged = [s for s, _ in metric_steps(out, name, "loss")]
        return max(logged) if logged and max(logged) >= 2 else None

    with Killer("ray::RolloutWorker", after_step_2, count=2) as rollout:
        summary = train(cfg)
    assert rollout.error is None and rollout.killed_pid is not None, "no rollout worker was killed"
    assert rollout.seen <= steps - 3, f"killed after step {rollout.seen}: too late to prove anything"

    client = MlflowClient(summary["mlflow_tracking_uri"])
    run_id = summary["mlflow_run_id"]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert summary["rollout_restarts"] == 1 and history(client, run_id, "count/rollout_restarts")[-1] == (steps, 1.0)
    assert {s for s, _ in history(client, run_id, "loss")} == set(range(1, steps + 1))
    # a second group was set up, after the kill, with the restarted worker in it
    set_ups = history(client, run_id, "sync/group_set_ups")
    assert set_ups[0][1] == 1 and set_ups[-1][1] >= 2, set_ups
    assert min(s for s, v in set_ups if v >= 2) > rollout.seen
    # every experience trained on was made with exactly its version's snapshot (debug_check_sync)
    assert history(client, run_id, "count/sync_checked")[-1][1] >= steps
    # (each sync waits for every worker's receive: the new process took every broadcast since)
    assert sum(bool(w.get("restarted")) for w in summary["rollout_workers"]) <= 1, summary["rollout_workers"]
    print(f"\nrollout worker pid {rollout.killed_pid} killed after step {rollout.seen}; groups set up: "
          f"{set_ups[-1][1]:.0f}; fit {summary['seconds']:.0f} s")


# -- 5. a re-run whose steps blow up -----------------------------------------------------------
@pytest.mark.slow  # the FLUX.2-klein fault run (faults_run): ~2.5 min on 2 cores
def test_rerun_resumes_in_the_same_run_and_nonfinite_steps_stop_it_with_a_usable_checkpoint(faults_run, out):
    """Re-running with the same train.run_name resumes from the last checkpoint (step 10) in the
    same MLflow run, here as colocated D-OPSD on FLUX.2-klein (reference-image teacher).
    optim.lr=1e30 is a real cause: step 11 is finite but its update overflows the LoRA
    weights, so steps 12 and 13 have a non-finite loss: both are skipped and counted, the run
    stops after optim.max_consecutive_skips=2, with no retry (max_failures=1), and no
    checkpoint is written during the streak: the last one is step 10's, complete and finite."""
    first, _, _ = faults_run
    cfg = config(out, RUN, *FLUX, "runtime.max_failures=1", "optim.lr=1e30", "optim.max_consecutive_skips=2",
                 steps=STEPS + 6)
    with pytest.raises(FloatingPointError) as err:
        train(cfg)
    message = str(err.value)
    assert "2 consecutive steps had a non-finite loss or non-finite gradients" in message
    assert f"training stopped at step {STEPS + 3}" in message and "optim.lr" in message

    client = MlflowClient(first["mlflow_tracking_uri"])
    run_id = first["mlflow_run_id"]
    assert (out / RUN / "mlflow_run_id.txt").read_text().strip() == run_id  # the same MLflow run
    resumed = history(client, run_id, "learner/resumed_from_step")
    assert [v for _, v in resumed][1:] == [float(STEPS)]  # resumed once at 10: the stop was not retried
    assert [s for s, _ in history(client, run_id, "loss/dopsd")] == [STEPS + 1]  # 12 and 13 were not finite
    # klein's native 4-step schedule: 4 trained states per roll-out
    assert sum(1 for k in client.get_run(run_id).data.metrics if k.startswith("loss/state_")) == 4
    assert history(client, run_id, "count/skipped_nonfinite")[-3:] == [
        (STEPS + 1, 0.0), (STEPS + 2, 1.0), (STEPS + 3, 2.0)]
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and "non-finite" in run.data.tags["dopsd.stopped"]

    experiment_dir = out / RUN / "ray_train" / RUN
    last = Path(latest_checkpoint(experiment_dir).uri)
    assert last.name == checkpoint_dir_name(STEPS) and str(last) in message
    assert not (experiment_dir / checkpoint_dir_name(STEPS + 2)).exists()  # due, but inside the streak
    assert check_checkpoint(last) is None
    for name in ("student", "teacher"):
        assert all(torch.isfinite(v).all() for v in load_file(str(last / f"{name}.safetensors")).values())


# -- 3. a checkpoint write that does not finish ---------------------------------------------
WRITER = """
import sys, torch
from dopsd_ray.checkpoint import upload_checkpoint, write_checkpoint_files
from dopsd_ray.storage import Storage
model = torch.nn.Linear(4, 4)
opt = torch.optim.AdamW(model.parameters())
big = {"w": torch.randn(16 * 1024 * 1024)}  # 64 MB: the copy into storage takes a while
local = write_checkpoint_files(sys.argv[1], 0, 1, 4, {}, opt, big, {"w": torch.zeros(1)})
upload_checkpoint(local, Storage(sys.argv[2]), sys.argv[3])
print("finished")
"""


def small_checkpoint(directory, step, value):
    model = torch.nn.Linear(4, 4)
    with torch.no_grad():
        model.weight.fill_(value)
    opt = torch.optim.AdamW(model.parameters())
    state = dict(model.state_dict())
    return write_checkpoint_files(directory, 0, 1, step, {"skipped_nonfinite": 0}, opt, state, state)


def test_a_killed_or_failed_checkpoint_write_never_replaces_the_last_good_one(tmp_path):
    import dopsd_ray.checkpoint as checkpoint
    import dopsd_ray.weights as weights_module

    assert (checkpoint.STUDENT, checkpoint.TEACHER) == (weights_module.STUDENT, weights_module.TEACHER)
    storage = tmp_path / "ray_train" / "run"
    experiment = Storage(storage)
    good = upload_checkpoint(small_checkpoint(tmp_path / "local2", 2, 0.5), experiment, checkpoint_dir_name(2))
    assert check_checkpoint(good) is None and latest_checkpoint(storage).uri == good

    # a writer process SIGKILLed while it copies the step-4 checkpoint into storage
    target = storage / checkpoint_dir_name(4)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "local4"), str(storage),
                               checkpoint_dir_name(4)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not any(target.glob(".student.safetensors.*partial")) and writer.poll() is None:
        assert time.monotonic() < deadline, "the writer never started copying"
        time.sleep(0.001)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert writer.returncode == -signal.SIGKILL, "the writer finished before it was killed"
    assert not (target / "student.safetensors").exists() and not (target / "state.json").exists()
    assert "state.json" in check_checkpoint(target)
    assert latest_checkpoint(storage).uri == good  # the last good one, not the newer broken one

    # a write that raises partway (a teacher that is not a tensor): nothing half-written is left
    with pytest.raises(Exception):
        write_checkpoint_files(tmp_path / "local6", 0, 1, 6, {}, torch.optim.AdamW(torch.nn.Linear(2, 2).parameters()),
                               {"w": torch.ones(2)}, {"w": "not a tensor"})
    left = {p.name for p in (tmp_path / "local6").iterdir()}
    assert "optimizer_rank0.safetensors" in left and not left & {"teacher.safetensors", "state.json"}
    assert not [n for n in left if n.endswith(".partial")]
    assert check_checkpoint(tmp_path / "local6") is not None

    # a damaged file inside an otherwise complete checkpoint (truncated on disk) is caught too
    damaged = Path(upload_checkpoint(small_checkpoint(tmp_path / "local8", 8, 2.0), experiment,
                                     checkpoint_dir_name(8)))
    data = (damaged / "teacher.safetensors").read_bytes()
    (damaged / "teacher.safetensors").write_bytes(data[: len(data) // 2])
    assert "damaged" in check_checkpoint(damaged)
    assert latest_checkpoint(storage).uri == good

    # resuming: the checkpoint Ray Train registered, which must be readable (a registered one that is
    # not fails the run, naming it: never an older one, never step 0); with none, the newest complete one
    for registered in (target, damaged):
        with pytest.raises(CheckpointUnreadable, match=f"cannot resume.*{registered.name}"):
            usable_checkpoint(Checkpoint.from_directory(str(registered)), experiment)
    assert usable_checkpoint(Checkpoint.from_directory(good), experiment).uri == good
    weights = FullWeights(torch.nn.Linear(4, 4))
    with pytest.raises(CheckpointUnreadable, match="cannot resume"):
        load_checkpoint(target, weights, 0, 1)
    state = load_checkpoint(usable_checkpoint(None, experiment), weights, 0, 1)
    assert state.step == 2 and torch.all(weights.model.weight == 0.5) and state.optimizer_tensors


# -- 5. non-finite gradients with a finite loss, and gradient accumulation --------------------
def ds_engine(zero_stage: int, dtype: str, *overrides, optimizer=torch.optim.AdamW):
    """A real DeepSpeed engine (world size 1, gloo) on a tiny Linear, with the learner's
    DeepSpeed settings; (engine, a function returning its full weights)."""
    import deepspeed

    from dopsd_ray.learner import deepspeed_config
    from dopsd_ray.sync.buckets import gather_zero3_buckets

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1).to({"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype])
    config = deepspeed_config(load_config(TINY, [f"runtime.zero_stage={zero_stage}", f"model.dtype={dtype}",
                                                 "train.batch_size=1", *overrides]))
    config["zero_allow_untested_optimizer"] = optimizer is not torch.optim.AdamW  # SGD: ZeRO runs it, untested
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer(model.parameters(), lr=0.1), config=config)

    def weights():
        return {k: v.clone() for b in gather_zero3_buckets(list(engine.module.named_parameters()), 10**6)
                for k, v in b.items()}
    return engine, weights


def learner_step(engine, zero_stage: int, *micro_losses) -> bool:
    """One optimizer step as Learner.optimizer_step takes it: backward_micro for each
    micro-batch (each loss is computed just before its backward), then finish_step."""
    from dopsd_ray.learner import backward_micro, finish_step
    from dopsd_ray.ranks import LearnerRanks

    ranks, finite = LearnerRanks(0, 1, "cpu"), torch.tensor(True)
    for i, loss in enumerate(micro_losses):
        finite = backward_micro(engine, loss(), last=i == len(micro_losses) - 1) & finite
    return finish_step(engine, ranks, zero_stage, finite)


def inf_gradient(engine, x):
    """sqrt at 0: the loss is 0, its gradient is inf (a real overflow, no injection)."""
    y = engine(x).float().sum()
    return torch.sqrt(y - y.detach())


def engine_steps(zero_stage: int, dtype: str) -> dict:
    engine, weights = ds_engine(zero_stage, dtype)
    x = torch.ones(1, 4, dtype=next(engine.module.parameters()).dtype)
    out = {}
    before = weights()
    out["inf_grad_loss"] = inf_gradient(engine, x).item()
    out["inf_grad_applied"] = learner_step(engine, zero_stage, lambda: inf_gradient(engine, x))
    out["inf_grad_unchanged"] = all(torch.equal(before[k], v) for k, v in weights().items())
    out["nan_loss_applied"] = learner_step(engine, zero_stage, lambda: engine(x).float().sum() * math.nan)
    out["nan_loss_unchanged"] = all(torch.equal(before[k], v) for k, v in weights().items())
    out["good_applied"] = learner_step(engine, zero_stage, lambda: (engine(x).float() - 1).pow(2).sum())
    out["good_changed"] = not all(torch.equal(before[k], v) for k, v in weights().items())
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_nonfinite_gradients_skip_the_optimizer_step(deepspeed_world1, dtype):
    """ZeRO-3 (the default), ZeRO-2 and stage 0 (plain data parallel), in this process (world size 1),
    in fp32 and in bf16 (where DeepSpeed checks only with bf16.check_grad_overflow)."""
    results = {stage: engine_steps(stage, dtype) for stage in (3, 2, 0)}
    for stage, got in results.items():
        assert got["inf_grad_loss"] == 0.0, stage  # a finite loss ...
        assert got["inf_grad_applied"] is False and got["inf_grad_unchanged"], stage  # ... whose step was skipped
        assert got["nan_loss_applied"] is False and got["nan_loss_unchanged"], stage
        assert got["good_applied"] is True and got["good_changed"], stage  # the next good step goes through


@pytest.mark.parametrize("zero_stage", [3, 2, 0])
def test_gradient_accumulation_equals_one_larger_batch_and_a_bad_micro_batch_skips_the_step(
        deepspeed_world1, zero_stage):
    """train.grad_accum=2 with batch 1 takes the same steps as batch 2 (SGD, no clipping: an
    update proportional to the gradient). A step with one non-finite micro-batch is skipped
    whole, whichever micro-batch it is: a loss of inf whose gradients are finite (only the loss
    check can catch it, after a good micro-batch was accumulated) or an inf gradient under a
    finite loss (before a good one); nothing of a skipped step reaches the next one."""
    no_clip = "optim.grad_clip=1e9"
    big, big_weights = ds_engine(zero_stage, "float32", no_clip, optimizer=torch.optim.SGD)
    accum, accum_weights = ds_engine(zero_stage, "float32", no_clip, "train.grad_accum=2", optimizer=torch.optim.SGD)
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(1))
    y = torch.randn(4, 1, generator=torch.Generator().manual_seed(2))

    def mse(engine, rows):  # the module itself, as the learner calls it (not engine.forward)
        return lambda: (engine.module(x[rows]) - y[rows]).pow(2).mean()

    before = accum_weights()
    assert learner_step(accum, zero_stage, mse(accum, [0]), lambda: mse(accum, [1])() + math.inf) is False
    assert learner_step(accum, zero_stage, lambda: inf_gradient(accum, x[:1]), mse(accum, [1])) is False
    assert all(torch.equal(before[k], v) for k, v in accum_weights().items())
    for rows in ([0, 1], [2, 3]):
        assert learner_step(big, zero_stage, mse(big, rows)) is True
        assert learner_step(accum, zero_stage, mse(accum, rows[:1]), mse(accum, rows[1:])) is True
        got, want = accum_weights(), big_weights()
        assert not torch.equal(got["weight"], before["weight"])
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)


TWO_RANKS = """
import json, math, os, sys
import deepspeed, torch
from dopsd_ray.recipes import load_config
from dopsd_ray.learner import backward_micro, deepspeed_config, finish_step
from dopsd_ray.ranks import LearnerRanks
from dopsd_ray.sync.buckets import gather_zero3_buckets

torch.set_num_threads(1)
rank = int(os.environ["RANK"])
deepspeed.init_distributed(dist_backend="gloo")
torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
cfg = load_config(sys.argv[1], ["train.batch_size=1", "train.grad_accum=2"])  # ZeRO-3
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.1),
                                  config=deepspeed_config(cfg))
ranks = LearnerRanks(rank, 2, "cpu")

def weights():
    return {k: v.clone() for b in gather_zero3_buckets(list(engine.module.named_parameters()), 10**6)
            for k, v in b.items()}

def step(bad_rank):
    finite = torch.tensor(True)
    for micro in range(2):
        loss = (engine(torch.ones(1, 4)) - 1).pow(2).mean()
        if rank == bad_rank and micro == 1:
            loss = loss + math.inf  # this rank's second micro-batch: a non-finite loss, finite gradients
        finite = backward_micro(engine, loss, last=micro == 1) & finite
    return finish_step(engine, ranks, 3, finite)

before = weights()
out = {"bad_applied": step(bad_rank=1)}
out["unchanged"] = all(torch.equal(before[k], v) for k, v in weights().items())
out["good_applied"] = step(bad_rank=None)
out["changed"] = not all(torch.equal(before[k], v) for k, v in weights().items())
print("RESULT " + json.dumps(out), flush=True)
"""


def two_ranks(script: str, *args: str, timeout_s: float) -> list[dict]:
    """Run `script` as learner ranks 0 and 1 (two processes, one gloo group over a free port);
    each rank's JSON after "RESULT ", in rank order."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                   LOCAL_RANK=str(rank), PYTHONPATH=str(ROOT))
        procs.append(subprocess.Popen([sys.executable, "-c", script, *args], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=timeout_s)[0] for p in procs]
    for p, output in zip(procs, outputs):
        assert p.returncode == 0, output[-4000:]
    return [json.loads(output.split("RESULT ", 1)[1]) for output in outputs]


@pytest.mark.slow
def test_a_nonfinite_micro_batch_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    """Two learner ranks (two processes, gloo, ZeRO-3, two micro-batches a step): rank 1's second
    micro-batch has a non-finite loss, rank 0's are all finite. Both ranks skip the step and
    change nothing, and take the next good step together. (Processes of their own: one per
    rank, each with its own default group; about 20 s on 2 cores, hence slow.)"""
    for rank, got in enumerate(two_ranks(TWO_RANKS, str(TINY), timeout_s=300)):
        assert got == {"bad_applied": False, "unchanged": True, "good_applied": True, "changed": True}, rank


# -- 7. nothing is unpickled ---------------------------------------------------------------
UNSAFE = [
    (re.compile(r"\bpickle\.loads?\("), "pickle.load"),
    (re.compile(r"\bcloudpickle\.loads?\("), "cloudpickle.load"),
    (re.compile(r"\bjoblib\.load\("), "joblib.load"),
    (re.compile(r"\bdill\.loads?\("), "dill.load"),
    (re.compile(r"allow_pickle\s*=\s*True"), "numpy allow_pickle"),
    (re.compile(r"\bweights_only\s*=\s*False"), "torch.load(weights_only=False)"),
]


def test_weights_and_checkpoints_are_never_unpickled():
    problems = []
    for path in sorted([*(ROOT / "dopsd_ray").rglob("*.py"), *(ROOT / "jobs").glob("*.py"),
                        *(ROOT / "benchmarks").glob("*.py")]):
        text = path.read_text()
        for pattern, what in UNSAFE:
            problems += [f"{path.relative_to(ROOT)}: {what}" for _ in pattern.finditer(text)]
        for call in re.finditer(r"\btorch\.load\(", text):  # only with weights_only=True
            args = text[call.end(): text.find(")", call.end()) + 1]
            if "weights_only=True" not in args:
                problems.append(f"{path.relative_to(ROOT)}: torch.load without weights_only=True")
    assert problems == []
    # what checkpoints and exports are made of: safetensors and JSON, read with safetensors / json
    source = (ROOT / "dopsd_ray" / "checkpoint.py").read_text()
    assert "torch.load" not in source and "from safetensors.torch import load_file" in source
