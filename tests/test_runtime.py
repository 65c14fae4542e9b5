"""End to end on a real local Ray: Ray Data -> rollout workers -> Ray Train + DeepSpeed -> MLflow.

More end-to-end runs live in tests/test_reliability.py, where faults are injected into
them: FLUX.2-klein async SFT (a rollout worker killed), FLUX.2-klein colocated D-OPSD (the
learner killed) and the re-run with the same train.run_name (resumes in the same MLflow run).
"""

import json
from pathlib import Path

import pytest
import torch
from diffusers import ZImagePipeline
from mlflow.tracking import MlflowClient
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

from dopsd_ray.config import load_config
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


@pytest.fixture(scope="module")
def colocated(out):
    # grids at steps 0, 2, 4 (tiny.yaml's two validation prompts + the validation pairs), exports at 2 and 4
    return run(out, "colocated", "train.sample_every=2", "train.export_every=2", steps=4)


def test_colocated_dopsd_logs_metrics_grid_and_exports(colocated):
    from test_samples import grid_cells, is_empty

    summary, client = colocated
    run_id = summary["mlflow_run_id"]
    losses = history(client, summary, "loss")
    assert [s for s, _ in losses] == [1, 2, 3, 4] and all(v > 0 for _, v in losses)
    for key in ("grad_norm", "lr", "images_per_s", "trained_states_per_s", "learner/wait_fraction"):
        assert history(client, summary, key), key
    run_params = client.get_run(run_id).data.params
    assert run_params["algorithm.name"] == "dopsd" and run_params["runtime.mode"] == "colocated"

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


def test_disaggregated_on_policy_reproduces_colocated_losses(out, colocated):
    summary, client = run(out, "onpolicy", "runtime.mode=disaggregated", "runtime.num_rollout_workers=1",
                          "runtime.max_staleness=0", "runtime.debug_check_sync=true")
    ref = history(colocated[1], colocated[0], "loss")[:3]  # the colocated run goes one step further
    got = history(client, summary, "loss")
    # same seeds, same data order, same weights at every version: equal up to float noise
    assert [s for s, _ in got] == [s for s, _ in ref]
    for (_, a), (_, b) in zip(got, ref):
        assert a == pytest.approx(b, rel=1e-4)
    assert all(v == 0 for _, v in history(client, summary, "staleness"))
    # every experience's weights were exactly the learner's gathered snapshot of its version
    assert history(client, summary, "count/sync_checked")[-1][1] == 3
    assert summary["rollout_workers"][0]["version"] == 3  # the worker holds the final snapshot


def test_async_never_trains_on_experiences_older_than_max_staleness(out):
    summary, client = run(out, "async", "runtime.mode=disaggregated", "runtime.num_rollout_workers=2",
                          "runtime.max_staleness=1", "runtime.teacher_targets=rollout",
                          "runtime.debug_check_sync=true", steps=4)
    staleness = [v for _, v in history(client, summary, "staleness")]
    assert len(staleness) == 4 and max(staleness) <= 1
    assert history(client, summary, "count/sync_checked")[-1][1] == 4


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


def test_sft_baseline_on_two_learner_ranks_with_zero3(out):
    summary, client = run(out, "sft-zero3x2", "algorithm.name=sft", "runtime.num_learners=2",
                          "runtime.zero_stage=3", "train.batch_size=1")
    assert [s for s, _ in history(client, summary, "loss/sft")] == [1, 2, 3]
    assert history(client, summary, "images_per_s")
    assert (Path(summary["export"]) / "pytorch_lora_weights.safetensors").is_file()
