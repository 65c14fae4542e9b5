"""End to end on a real local Ray: Ray Data -> rollout workers -> Ray Train + DeepSpeed -> MLflow.

More end-to-end runs live in tests/test_reliability.py, where faults are injected into
them: FLUX.2-klein async SFT (a rollout worker killed), FLUX.2-klein colocated D-OPSD (the
learner killed) and the re-run with the same train.run_name (resumes in the same MLflow run).
"""

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
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
    # eval.at_end too: the run evaluates its export against the base (a small evaluation)
    return run(out, "colocated", "eval.at_end=true", "eval.seeds=[5]", "eval.samples_per_prompt=1", "eval.steps=2",
               "eval.size=32")


def test_colocated_dopsd_logs_metrics_grid_and_exports(colocated):
    summary, client = colocated
    losses = history(client, summary, "loss")
    assert [s for s, _ in losses] == [1, 2, 3] and all(v > 0 for _, v in losses)
    for key in ("grad_norm", "lr", "images_per_s", "trained_states_per_s", "learner/wait_fraction"):
        assert history(client, summary, key), key
    artifacts = [a.path for a in client.list_artifacts(summary["mlflow_run_id"], "samples")]
    assert "samples/step_000000.png" in artifacts and "samples/step_000003.png" in artifacts
    lora = load_file(str(Path(summary["export"]) / "pytorch_lora_weights.safetensors"))
    assert lora and all(k.startswith("transformer.") for k in lora)
    run_params = client.get_run(summary["mlflow_run_id"]).data.params
    assert run_params["algorithm.name"] == "dopsd" and run_params["runtime.mode"] == "colocated"


def test_at_end_evaluates_the_export_into_the_training_run(colocated):
    summary, client = colocated
    scores = summary["eval"]  # base and this run, on the bundled data's first captions
    assert list(scores) == ["base", "colocated"]
    assert scores["base"]["sharpness"]["per_seed"] == [1.0] and "prior_drift/mse" not in scores["colocated"]
    run_id = summary["mlflow_run_id"]
    history = client.get_metric_history(run_id, "eval/colocated/sharpness")
    assert [(m.step, m.value) for m in history] == [(3, scores["colocated"]["sharpness"]["mean"])]
    assert {"eval/results.json", "eval/table.md", "eval/samples_train.png"} <= {
        a.path for a in client.list_artifacts(run_id, "eval")}
    assert (Path(summary["run_dir"]) / "eval" / "table.md").read_text().startswith("| metric | base | colocated |")


def test_disaggregated_on_policy_reproduces_colocated_losses(out, colocated):
    summary, client = run(out, "onpolicy", "runtime.mode=disaggregated", "runtime.num_rollout_workers=1",
                          "runtime.max_staleness=0", "runtime.debug_check_sync=true")
    ref = history(colocated[1], colocated[0], "loss")
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
