"""The learner in one process, without Ray: its real setup, sources, engine and loop on the
committed toy model (LocalContext). The same code runs inside Ray Train end to end in
tests/test_runtime.py; here each behaviour is checked directly, in seconds.

    resume:     a run stopped on request at step 2 and resumed reproduces an uninterrupted run
                exactly (losses, student, EMA teacher, optimizer state): the stream's resume-skip,
                the optimizer and fp32 EMA restore, the stop path's checkpoint
    non-finite: steps with a non-finite loss are skipped and counted, the run stops after
                optim.max_consecutive_skips, no checkpoint is written during the streak
    lost:       a RolloutLost in the experience queue stops every rank before any backward
    agreement:  two ranks (two processes, gloo) make at most 2 collectives of their own per step
                at ZeRO 1-3, and agree on the step
"""

import math
import queue
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dopsd_ray.algorithms.steps import RolloutLost
from dopsd_ray.checkpoint import checkpoint_dir_name, check_checkpoint
from dopsd_ray.data.stream import StreamSpec, local_rows
from dopsd_ray.learner import ExperienceQueue, Learner, LearnerInputs
from dopsd_ray.learner.context import LocalContext
from dopsd_ray.recipes import load_config
from dopsd_ray.tracking import ListSink

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "configs" / "toy.yaml"


def toy_config(out, *overrides, steps=4):
    return load_config(TOY, [f"train.output_dir={out}", f"train.steps={steps}", "train.checkpoint_every=2",
                             "train.sample_every=1000", "train.validation_prompts=[]", "train.batch_size=2",
                             *overrides])


@pytest.fixture(scope="module")
def rows():
    cfg = toy_config("/unused")
    return local_rows(cfg.data.path, StreamSpec.from_config(cfg, 8))


class StopAfter:
    """A stop flag (stop.StopWatch's surface) that the driver sets during step `step`: rank 0
    asks it once per step, in the step's agreement."""

    def __init__(self, step: int):
        self.step, self.asked = step, 0

    def requested(self) -> bool:
        self.asked += 1
        return self.asked >= self.step


def learner(cfg, rows, sink, **inputs) -> Learner:
    inputs = LearnerInputs(cfg.model_dump(mode="json"), cfg.model.path, tracking=sink, **inputs)
    return Learner(inputs, LocalContext(Path(cfg.run_dir) / "checkpoints", {"train": rows})).setup()


def run(cfg, rows, **inputs) -> tuple[Learner, ListSink, str | None]:
    sink = inputs.pop("sink", None) or ListSink()
    one = learner(cfg, rows, sink, **inputs)
    try:
        stopped = one.train()
    finally:
        one.reporter.close()
    return one, sink, stopped


def losses(sink: ListSink) -> dict[int, float]:
    return {s: m["loss"] for s, m in sink.metrics if "loss" in m}


def test_a_run_stopped_on_request_and_resumed_equals_an_uninterrupted_one(tmp_path, rows):
    whole, whole_sink, _ = run(toy_config(tmp_path / "whole"), rows)
    sink = ListSink()
    first, _, stopped = run(toy_config(tmp_path / "split"), rows, sink=sink, stop=StopAfter(2))
    assert stopped is None and first.interrupted and first.step == 2
    ckpt = tmp_path / "split" / "toy-dopsd" / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == [checkpoint_dir_name(2)]  # the stop's (and the due) one
    second, second_sink, _ = run(toy_config(tmp_path / "split"), rows)
    assert second.resumed_from == 2 and second.step == 4
    assert second_sink.metrics[0] == (2, {"learner/resumed_from_step": 2})
    assert losses(sink) == {s: v for s, v in losses(whole_sink).items() if s <= 2}
    assert losses(second_sink) == {s: v for s, v in losses(whole_sink).items() if s > 2}  # exactly
    whole_ckpt = tmp_path / "whole" / "toy-dopsd" / "checkpoints" / checkpoint_dir_name(4)
    names = sorted(p.name for p in whole_ckpt.glob("*.safetensors"))  # (fp32: the teacher is its own EMA shadow)
    assert names == ["optimizer_rank0.safetensors", "student.safetensors", "teacher.safetensors"]
    for name in names:
        want, got = load_file(str(whole_ckpt / name)), load_file(str(ckpt / checkpoint_dir_name(4) / name))
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name
    export = load_file(str(tmp_path / "split" / "toy-dopsd" / "export" / "pytorch_lora_weights.safetensors"))
    assert export and all(torch.isfinite(v).all() for v in export.values())


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run_without_a_checkpoint(tmp_path, rows):
    cfg = toy_config(tmp_path, "optim.lr=1e30", "optim.max_consecutive_skips=2", "train.checkpoint_every=1",
                     steps=10)
    one, sink, stopped = run(cfg, rows)
    assert stopped is not None and "consecutive steps had a non-finite loss" in stopped
    assert sink.tags == {"dopsd.stopped": stopped}
    skipped = one.counters["skipped_nonfinite"]
    assert skipped == 2 == one.consecutive_skips and one.step < 10
    logged = losses(sink)
    assert [s for s, v in logged.items() if not math.isfinite(v)] == [one.step - 1, one.step]
    last_good = one.step - 2
    ckpt = tmp_path / "toy-dopsd" / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir())[-1] == checkpoint_dir_name(last_good)  # none during the streak
    assert check_checkpoint(ckpt / checkpoint_dir_name(last_good)) is None
    assert all(torch.isfinite(v).all() for v in load_file(str(ckpt / checkpoint_dir_name(last_good) /
                                                               "student.safetensors")).values())
    assert not (tmp_path / "toy-dopsd" / "export").exists()


def test_a_lost_rollout_worker_stops_the_learner_before_any_backward(tmp_path, rows):
    cfg = toy_config(tmp_path, "runtime.mode=disaggregated", "runtime.sync_timeout_s=5")
    experiences = queue.Queue()
    experiences.put(RolloutLost("rollout worker 0 is gone"))
    one = learner(cfg, rows, ListSink(), source=ExperienceQueue(experiences))
    before = {k: v.clone() for k, v in one.weights.named_parameters()}
    result = one.train_step()
    assert result.lost and not result.applied and one.step == 0
    assert all(torch.equal(before[k], v) for k, v in one.weights.named_parameters())
    one.reporter.close()


TWO_RANKS = """
import json, os, sys
import torch
import torch.distributed as dist
torch.set_num_threads(1)
rank = int(os.environ["RANK"])
dist.init_process_group("gloo")
from dopsd_ray.data.stream import StreamSpec, local_rows
from dopsd_ray.learner import Learner, LearnerInputs
from dopsd_ray.learner.context import LocalContext
from dopsd_ray.recipes import load_config

calls = []
def counted(name, fn):
    def wrapper(*args, **kwargs):
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("dopsd_ray"):  # the project's own agreements, not DeepSpeed's reductions
            calls.append(name)
        return fn(*args, **kwargs)
    return wrapper
for name in ("all_reduce", "broadcast", "all_gather", "barrier", "reduce", "all_gather_object", "broadcast_object_list"):
    setattr(dist, name, counted(name, getattr(dist, name)))

out = {}
for stage in (1, 2, 3):
    cfg = load_config(sys.argv[1], [f"train.output_dir={sys.argv[2]}/z{stage}", "train.steps=3", "train.batch_size=1",
                                    "train.checkpoint_every=1000", "train.sample_every=1000", "train.validation_prompts=[]",
                                    f"runtime.zero_stage={stage}", "runtime.num_learners=2"])
    rows = local_rows(cfg.data.path, StreamSpec.from_config(cfg, 8))
    inputs = LearnerInputs(cfg.model_dump(mode="json"), cfg.model.path)
    learner = Learner(inputs, LocalContext(f"{sys.argv[2]}/z{stage}/ckpt", {"train": rows}, rank, 2)).setup()
    learner.start()
    per_step, applied = [], []
    for _ in range(3):
        calls.clear()
        result = learner.train_step()
        per_step.append(list(calls))
        applied.append(result.applied)
    out[stage] = {"per_step": per_step, "applied": applied, "loss": result.sums[0]}
print("RESULT " + json.dumps(out), flush=True)
"""


def test_two_ranks_agree_once_per_step_at_every_zero_stage(tmp_path):
    """Two learner ranks (two processes, gloo): per step at most 2 collectives of the project's own
    (the experience check before any backward and the step's one agreement) at ZeRO 1, 2 and 3,
    and both ranks see the same agreed sums and the same applied steps."""
    from test_reliability import two_ranks

    results = two_ranks(TWO_RANKS, str(TOY), str(tmp_path), timeout_s=600)
    for stage in ("1", "2", "3"):
        for got in results:
            assert all(1 <= len(calls) <= 2 for calls in got[stage]["per_step"]), (stage, got[stage]["per_step"])
            assert got[stage]["applied"] == [True, True, True], stage
        assert results[0][stage]["loss"] == results[1][stage]["loss"], stage  # one agreed value on both ranks
    print("\nper-step collectives (rank 0):", {s: results[0][s]["per_step"] for s in ("1", "2", "3")})
