"""Preflight placement refusals: a GPU learner with CPU-only rollout workers, and the
collective (NCCL) transport where two ranks could share one GPU or a rollout worker has
none. Each fails from the recipe
alone, before Ray starts."""

from pathlib import Path

import pytest
from test_config import run_train_main  # jobs/train.py's main(args), and whether Ray started

from dopsd_ray.config import ConfigError
from dopsd_ray.recipes import load_config
from dopsd_ray.preflight import check_placement, preflight

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
DISAGG = ["runtime.mode=disaggregated", "runtime.num_rollout_workers=1"]

CPU_ROLLOUT = [*DISAGG, "runtime.learner_resources={CPU: 1, GPU: 1}", "runtime.rollout_resources={CPU: 1}"]
SHARED_GPU = [*DISAGG, "runtime.sync_transport=collective",
              "runtime.learner_resources={CPU: 1, GPU: 1}", "runtime.rollout_resources={CPU: 1, GPU: 0.5}"]
# (overrides, what the one error line must name)
REFUSED = {
    "cpu_rollout": (CPU_ROLLOUT, ["runtime.rollout_resources", "runtime.learner_resources",
                                  "runtime.allow_cpu_rollout=true"]),
    "rollout_gpu_0": ([*CPU_ROLLOUT, "runtime.rollout_resources={CPU: 1, GPU: 0}"],
                      ["runtime.rollout_resources", "runtime.allow_cpu_rollout=true"]),
    "fractional_rollout": (SHARED_GPU, ["runtime.sync_transport=collective",
                                        "runtime.rollout_resources={'CPU': 1.0, 'GPU': 0.5}",
                                        "whole GPUs", "runtime.sync_transport=object_store"]),
    "fractional_learner": ([*SHARED_GPU, "runtime.learner_resources={CPU: 1, GPU: 0.5}",
                            "runtime.rollout_resources={CPU: 1, GPU: 1}"],
                           ["runtime.sync_transport=collective", "runtime.learner_resources={'CPU': 1.0, 'GPU': 0.5}",
                            "runtime.sync_transport=object_store"]),
    "collective_cpu_rollout": ([*CPU_ROLLOUT, "runtime.allow_cpu_rollout=true", "runtime.sync_transport=collective"],
                               ["runtime.sync_transport=collective", "NCCL", "runtime.rollout_resources",
                                "runtime.sync_transport=object_store"]),
}
ALLOWED = {
    "cpu_rollout_allowed": [*CPU_ROLLOUT, "runtime.allow_cpu_rollout=true"],
    "collective_whole_gpus": [*SHARED_GPU, "runtime.rollout_resources={CPU: 1, GPU: 1}"],
    "collective_cpu_only": [*DISAGG, "runtime.sync_transport=collective"],  # gloo: no device to share
    "fractional_object_store": [*SHARED_GPU, "runtime.sync_transport=object_store"],
    "colocated_gpu_learner": ["runtime.learner_resources={CPU: 1, GPU: 1}"],  # learners roll out themselves
}


@pytest.mark.parametrize("name", REFUSED)
def test_placement_refusals_name_the_fields(name):
    overrides, named = REFUSED[name]
    cfg = load_config(TINY, overrides)
    with pytest.raises(ConfigError) as err:
        check_placement(cfg)
    msg = str(err.value)
    assert "\n" not in msg and all(n in msg for n in named), msg
    # preflight runs it first: on this GPU-less machine the local-resource check would refuse too
    with pytest.raises(ConfigError) as via_preflight:
        preflight(cfg)
    assert str(via_preflight.value) == msg


@pytest.mark.parametrize("name", ALLOWED)
def test_allowed_placements_pass(name):
    check_placement(load_config(TINY, ALLOWED[name]))


def test_placement_refusals_fail_jobs_train_before_ray_starts(tmp_path, monkeypatch):
    """jobs/train.py --config configs/tiny.yaml <overrides>: exit 2, one `error:` line naming
    the fields, Ray never started, nothing written."""
    # as test_config: a local Ray would be started here; no local_ray, Ray must not start at all
    monkeypatch.setenv("RAY_ADDRESS", "local")
    out = f"train.output_dir={tmp_path / 'runs'}"
    results, stderr = run_train_main([["--config", str(TINY), out, *overrides] for overrides, _ in REFUSED.values()])
    for (name, (_, named)), got in zip(REFUSED.items(), results, strict=True):
        assert got["code"] == 2, (name, got)
        assert got["stderr"].startswith("error: ") and got["stderr"].count("\n") == 1, (name, got["stderr"])
        assert all(n in got["stderr"] for n in named), (name, got["stderr"])
        assert not got["ray_started"], name
    assert "Traceback" not in stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("override, key", [("train.output_dir=s3://YOUR-BUCKET/dopsd", "train.output_dir"),
                                           ("data.path=s3://YOUR-BUCKET/shards/", "data.path")])
def test_the_recipes_bucket_placeholder_is_refused_in_one_line(override, key):
    """A cluster recipe run as it ships: one line naming the field and what to put there, before Ray."""
    with pytest.raises(ConfigError) as err:
        preflight(load_config(TINY, [override]))
    message = str(err.value)
    assert message.startswith(f"{key}='s3://YOUR-BUCKET/") and "\n" not in message
    assert f"{key}=s3://my-bucket/" in message
