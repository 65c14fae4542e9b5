"""End to end on a real local Ray: Ray Data -> rollout workers -> Ray Train + DeepSpeed -> MLflow.

More end-to-end runs live in tests/test_reliability.py, where faults are injected into
them: FLUX.2-klein async SFT (a rollout worker killed), FLUX.2-klein colocated D-OPSD (the
learner killed) and the re-run with the same train.run_name (resumes in the same MLflow run).
"""

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import ZImagePipeline
from mlflow.tracking import MlflowClient
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

from dopsd_ray.checkpoint import checkpoint_dir_name
from dopsd_ray.recipes import load_config
from dopsd_ray.driver import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


pytestmark = pytest.mark.usefixtures("local_ray")


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


def run(out, name, *overrides, steps=3):
    # one MLflow store for the module: each new store costs seconds of schema migrations
    cfg = load_config(TINY, [f"train.output_dir={out}", f"train.run_name={name}", f"train.steps={steps}",
                             "train.sample_every=1000", "train.checkpoint_every=2",
                             "runtime.sync_timeout_s=120", "runtime.max_failures=0",
                             f"tracking.tracking_uri=sqlite:///{out}/mlflow.db", *overrides])
    summary = train(cfg)
    client = MlflowClient(summary["mlflow_tracking_uri"])
    return summary, client


def history(client, summary, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(summary["mlflow_run_id"], key), key=lambda m: m.step)]


# two micro-batches of one image per step (the same images per step as tiny.yaml's batch of 2),
# the learning rate warming up, then decaying
ACCUMULATE = ["train.batch_size=1", "train.grad_accum=2", "optim.scheduler=cosine", "optim.warmup_steps=1"]
GRIDS = ["train.sample_every=2", "train.export_every=2"]
AT_END = ["eval.at_end=true", "eval.seeds=[5]", "eval.samples_per_prompt=1", "eval.steps=2", "eval.size=32"]


@pytest.fixture(scope="module")
def colocated(out):
    """(summary, client, what the driver printed): grids at steps 0, 2, 4 (tiny.yaml's two
    validation prompts + the validation pairs), exports at 2 and 4, and eval.at_end: the run
    evaluates its export against the base (a small evaluation)."""
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        summary, client = run(out, "colocated", *ACCUMULATE, *GRIDS, *AT_END, steps=4)
    return summary, client, printed.getvalue()


def test_colocated_dopsd_logs_metrics_grid_and_exports(colocated):
    from test_samples import grid_cells, is_empty

    summary, client, _ = colocated
    run_id = summary["mlflow_run_id"]
    losses = history(client, summary, "loss")
    assert [s for s, _ in losses] == [1, 2, 3, 4] and all(v > 0 for _, v in losses)
    for key in ("grad_norm", "lr", "images_per_s", "trained_states_per_s", "learner/wait_fraction"):
        assert history(client, summary, key), key
    run_params = client.get_run(run_id).data.params
    assert run_params["algorithm.name"] == "dopsd" and run_params["runtime.mode"] == "colocated"
    # the warm-up step at lr / 2, then a cosine from the full lr (1e-3) over the other three
    assert [v for _, v in history(client, summary, "lr")] == pytest.approx([5e-4, 1e-3, 7.5e-4, 2.5e-4])
    # a step's images are both micro-batches'
    seconds = dict(history(client, summary, "learner/step_seconds"))
    assert [v * seconds[s] for s, v in history(client, summary, "images_per_s")] == pytest.approx([2, 2, 2, 2])

    # sample grids: rows base / student / teacher / training image, one column per prompt
    samples = Path(summary["samples"])
    names = [f"step_{s:06d}.png" for s in (0, 2, 4)]
    assert sorted(p.name for p in samples.glob("step_*.png")) == names
    assert sorted(a.path for a in client.list_artifacts(run_id, "samples")) == [f"samples/{n}" for n in names]
    with safe_open(str(samples / "base.safetensors"), framework="pt") as f:  # the base row, for resumed runs
        base, prompts = f.get_tensor("images"), json.loads(f.metadata()["prompts"])
    columns, side = base.shape[0], base.shape[-1]
    pairs = columns - 2  # after tiny.yaml's two validation prompts
    assert prompts[:2] == load_config(TINY).train.validation_prompts and len(prompts) == columns and pairs >= 1
    grids = [grid_cells(samples / n, 4, columns, side) for n in names]
    for rows in grids:  # teacher and training image: the training-pair columns alone
        assert [[is_empty(c) for c in row] for row in rows[2:]] == [[True] * 2 + [False] * pairs] * 2
    assert all(g[0][c].tobytes() == grids[0][0][c].tobytes() for g in grids for c in range(columns))
    assert all(grids[0][1][c].tobytes() == grids[0][0][c].tobytes() for c in range(columns))  # step 0: the base
    assert all(grids[2][1][c].tobytes() != grids[0][1][c].tobytes() for c in range(columns))  # trained since

    # exports at steps 2 and 4, and the last again in export/, each loadable by the stock pipeline
    export = Path(summary["export"])
    logged = {a.path for d in ("export", "export/step_000002", "export/step_000004")
              for a in client.list_artifacts(run_id, d)}
    for d in ("", "step_000002/", "step_000004/"):
        assert f"export/{d}pytorch_lora_weights.safetensors" in logged, d
    loras = {d: load_file(str(export / d / "pytorch_lora_weights.safetensors")) for d in ("step_000002", "step_000004", ".")}
    assert all(k.startswith("transformer.") for k in loras["."])
    assert all(torch.equal(v, loras["step_000004"][k]) for k, v in loras["."].items())
    assert any(not torch.equal(v, loras["step_000002"][k]) for k, v in loras["."].items())
    pipe = ZImagePipeline.from_pretrained(str(Path(summary["run_dir"]) / "tiny_model"))
    for name, d in (("s2", "step_000002"), ("s4", ".")):
        pipe.load_lora_weights(str(export / d), adapter_name=name)
        loaded = get_peft_model_state_dict(pipe.transformer, adapter_name=name)
        assert all(torch.equal(loaded[k.removeprefix("transformer.")], v) for k, v in loras[d].items())


def test_the_driver_prints_a_progress_line_per_step_with_an_eta(colocated):
    """Not a terminal here: plain lines, drawn by the driver from learner rank 0's reports."""
    summary, client, printed = colocated
    lines = [line for line in printed.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["1/4", "2/4", "3/4", "4/4"], printed
    assert lines[0].endswith("eta --:--:--")  # the first step only starts the clock
    assert re.fullmatch(r"step 4/4  loss \d+\.\d{5}  [\d.]+ img/s  eta 00:00:00", lines[-1]), lines[-1]
    losses = [f"{v:.5f}" for _, v in history(client, summary, "loss")]
    assert [line.split()[3] for line in lines] == losses


@pytest.mark.slow  # a whole driver run of its own: the learner's logic is tested in process (test_learner.py)
def test_a_run_resumed_from_a_checkpoint_continues_exactly(out, colocated):
    """A new run given the colocated run's step-2 checkpoint resumes there and trains steps 3
    and 4 with the same learning rate and the same losses as the run that never stopped: the
    schedule is a function of the step, and the stream passes over the 2 x 2 micro-batches
    the checkpoint has seen, to the same images and noise."""
    summary, client, _ = colocated
    name = "resumed"
    shutil.copytree(Path(summary["run_dir"]) / "ray_train" / "colocated" / checkpoint_dir_name(2),
                    out / name / "ray_train" / name / checkpoint_dir_name(2))
    resumed, resumed_client = run(out, name, *ACCUMULATE, *GRIDS, steps=4)
    assert history(resumed_client, resumed, "learner/resumed_from_step") == [(2, 2.0)]
    for key in ("lr", "loss", "loss/dopsd", "grad_norm"):
        want = [(s, v) for s, v in history(client, summary, key) if s > 2]
        assert history(resumed_client, resumed, key) == want, key


def test_at_end_evaluates_the_export_into_the_training_run(colocated):
    summary, client, _ = colocated
    scores = summary["eval"]  # base and this run, on the bundled data's first captions
    assert list(scores) == ["base", "colocated"]
    assert scores["base"]["sharpness"]["per_seed"] == [1.0] and "prior_drift/mse" not in scores["colocated"]
    run_id = summary["mlflow_run_id"]
    history = client.get_metric_history(run_id, "eval/colocated/sharpness")
    assert [(m.step, m.value) for m in history] == [(4, scores["colocated"]["sharpness"]["mean"])]
    assert {"eval/results.json", "eval/table.md", "eval/samples_train.png"} <= {
        a.path for a in client.list_artifacts(run_id, "eval")}
    assert (Path(summary["run_dir"]) / "eval" / "table.md").read_text().startswith("| metric | base | colocated |")


def test_disaggregated_on_policy_with_cached_contexts_reproduces_colocated_losses(out, colocated):
    """With two micro-batches a step: each snapshot makes two experiences, both trained on at
    staleness 0 by the step of that version. Contexts come from the cache (data.cache_contexts)
    on the rollout worker and the learner; the colocated reference computes them: the cache
    must change nothing."""
    summary, client = run(out, "onpolicy", "runtime.mode=disaggregated", "runtime.num_rollout_workers=1",
                          "runtime.max_staleness=0", "runtime.debug_check_sync=true", "data.cache_contexts=true",
                          *ACCUMULATE, *GRIDS, steps=4)
    ref = history(colocated[1], colocated[0], "loss")
    got = history(client, summary, "loss")
    # same seeds, same data order, same weights at every version: equal up to float noise
    assert [s for s, _ in got] == [s for s, _ in ref]
    for (_, a), (_, b) in zip(got, ref):
        assert a == pytest.approx(b, rel=1e-4)
    assert all(v == 0 for _, v in history(client, summary, "staleness"))
    assert history(client, summary, "lr") == history(colocated[1], colocated[0], "lr")
    # every experience's weights were exactly the learner's gathered snapshot of its version
    assert history(client, summary, "count/sync_checked")[-1][1] == 8
    worker = summary["rollout_workers"][0]
    assert worker["version"] == 4  # the worker holds the final snapshot
    # the fill computed every pair's contexts (and the grids' prompts') once; the worker read its
    # 8 batches' (1 pair each, student + teacher) from the cache, and it and the learner dropped
    # their encoders (the learner's grids read the cache too)
    contexts = summary["contexts"]
    assert contexts["entries"] == contexts["computed"] > 0
    assert worker["context_hits"] >= 8 * 2 and worker["encoders_released_bytes"] > 0
    assert history(client, summary, "memory/encoders_released_gb")[0][1] > 0
    assert history(client, summary, "contexts/entries") == [(0, contexts["entries"])]


@pytest.mark.slow  # a whole driver run of its own: the learner's logic is tested in process (test_learner.py)
def test_async_never_trains_on_experiences_older_than_max_staleness(out):
    summary, client = run(out, "async", "runtime.mode=disaggregated", "runtime.num_rollout_workers=2",
                          "runtime.max_staleness=1", "runtime.teacher_targets=rollout",
                          "runtime.debug_check_sync=true", steps=4)
    staleness = [v for _, v in history(client, summary, "staleness")]
    assert len(staleness) == 4 and max(staleness) <= 1
    assert history(client, summary, "count/sync_checked")[-1][1] == 4


@pytest.mark.slow  # a whole driver run of its own: the learner's logic is tested in process (test_learner.py)
def test_collective_weight_sync_on_policy_with_teacher_targets(out):
    # one rollout worker: with two, a worker that stops can leave the other blocked in the
    # streaming split's epoch barrier, and the driver then waits sync_timeout_s for its stats
    summary, client = run(out, "collective", "runtime.mode=disaggregated", "runtime.num_rollout_workers=1",
                          "runtime.max_staleness=0", "runtime.sync_transport=collective",
                          "runtime.teacher_targets=rollout", "runtime.debug_check_sync=true")
    assert all(v == 0 for _, v in history(client, summary, "staleness"))
    # every trained experience's weights were exactly the broadcast snapshot of its version
    assert history(client, summary, "count/sync_checked")[-1][1] == 3
    for key in ("sync/seconds", "sync/bytes"):
        assert [s for s, _ in history(client, summary, key)] == [1, 2, 3], key
        assert all(v > 0 for _, v in history(client, summary, key)), key
    # the final broadcast (student + EMA teacher) reached the worker, stamped with the step
    assert summary["rollout_workers"][0]["version"] == 3 and summary["rollout_workers"][0]["sync_bytes"] > 0


@pytest.mark.slow  # a whole driver run of its own: the learner's logic is tested in process (test_learner.py)
def test_sft_baseline_on_two_learner_ranks_with_zero3(out):
    summary, client = run(out, "sft-zero3x2", "algorithm.name=sft", "runtime.num_learners=2",
                          "runtime.zero_stage=3", "train.batch_size=1")
    assert [s for s, _ in history(client, summary, "loss/sft")] == [1, 2, 3]
    assert history(client, summary, "images_per_s")
    assert (Path(summary["export"]) / "pytorch_lora_weights.safetensors").is_file()
