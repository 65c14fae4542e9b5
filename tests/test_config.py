"""Config: YAML + overrides, and errors that name the field and what is allowed."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from dopsd_ray.config import ConfigError, flatten, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads(recipe):
    cfg = load_config(recipe)
    assert cfg.algorithm.inference_steps == {"zimage": 8, "flux2_klein": 4, "toy": 4}[cfg.model.family]


def test_released_zimage_recipe_settings():
    cfg = load_config(ROOT / "configs" / "zimage_turbo_lora.yaml")
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.init) == (64, 128, "gaussian")
    assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay, cfg.optim.grad_clip) == (1e-4, (0.9, 0.999), 0.0, 1.0)
    assert (cfg.algorithm.ema_decay, cfg.algorithm.loss_space, cfg.algorithm.training_sigmas) == (0.9999, "x0", "recipe_4step")
    assert cfg.train.steps == 2000 and cfg.train.batch_size * cfg.runtime.num_learners == 4
    assert cfg.algorithm.states_per_rollout is None  # all K states, the recipe


def test_overrides_are_typed_and_nested(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {family: zimage, tiny: true}\noptim: {lr: 1.0e-4}\n")
    cfg = load_config(path, ["optim.lr=5e-5", "algorithm.training_sigmas=[1.0, 0.5, 0.0]", "runtime.learner_resources={CPU: 2}"])
    assert cfg.optim.lr == 5e-5
    assert cfg.algorithm.training_sigmas == [1.0, 0.5, 0.0]
    assert cfg.runtime.learner_resources == {"CPU": 2}
    assert flatten(cfg)["optim.lr"] == 5e-5


@pytest.mark.parametrize("override, field, hint", [
    (["optim.lrr=1"], "optim.lrr", "unknown key"),
    (["nosuchsection.x=1"], "nosuchsection", "unknown key"),
    (["optim.lr=fast"], "optim.lr", "valid number"),
    (["algorithm.loss_space=l1"], "algorithm.loss_space", "'x0' or 'velocity'"),
    (["runtime.max_staleness=-1"], "runtime.max_staleness", "greater than or equal to 0"),
    (["model.family=flux2_klein", "model.tiny=true", "model.teacher_context=vlm", "model.family=zimage",
      "model.teacher_context=reference"], "model", "not supported by family 'zimage'; allowed: vlm"),
    (["algorithm.training_sigmas=[1.0, 0.5]"], "algorithm", "must decrease strictly"),
    (["runtime.mode=colocated", "runtime.teacher_targets=rollout"], "runtime", "needs runtime.mode=disaggregated"),
    (["runtime.sync_every=4", "runtime.max_staleness=1"], "runtime", "max_staleness=1 < runtime.sync_every - 1"),
    (["model.tiny=false"], "model", "set model.path"),
])
def test_bad_values_name_the_field(override, field, hint):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs" / "tiny.yaml", override)
    assert f"{field}:" in str(err.value) and hint in str(err.value)


def test_a_family_is_picked_in_one_place(tmp_path):
    """Every name in families.FAMILIES has the same surface, and config reads the family's
    facts from it; any other name is a ValueError naming the known ones, never a fallback."""
    from dopsd_ray.families import FAMILIES, build_tiny, family_module, load_family, lora_targets, pipeline_class

    for name in FAMILIES:
        module = family_module(name)
        assert isinstance(module.TEACHER_CONTEXTS, tuple) and isinstance(module.INFERENCE_STEPS, int)
        assert lora_targets(name) == list(module.LORA_TARGETS) and pipeline_class(name) is module.PIPELINE_CLASS
        assert callable(module.build_tiny) and callable(module.from_config)
        cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"model.family={name}"])
        assert cfg.model.teacher_context == module.TEACHER_CONTEXTS[0]
        assert cfg.algorithm.inference_steps == module.INFERENCE_STEPS
    nope = SimpleNamespace(family="nope", path=str(tmp_path))
    for call in (lambda: lora_targets("nope"), lambda: pipeline_class("nope"), lambda: load_family(nope),
                 lambda: build_tiny(nope, tmp_path)):
        with pytest.raises(ValueError, match="unknown model family 'nope'; known: zimage, flux2_klein, toy"):
            call()


def test_an_unknown_family_fails_before_torch_is_imported():
    """Config validation imports a family's module (torch, diffusers) only for a known name."""
    code = ("import sys\nfrom dopsd_ray.config import ConfigError, load_config\n"
            "try:\n    load_config(None, ['model.family=nope'])\nexcept ConfigError as err:\n    print(err)\n"
            "print('torch imported:', 'torch' in sys.modules)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert "model.family: unknown model family; known: zimage, flux2_klein, toy (got 'nope')" in done.stdout, done.stderr
    assert "torch imported: False" in done.stdout


def test_missing_file_and_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["optim.lr"])


CALL_MAIN = r"""
import contextlib, io, json, runpy, sys
import ray


def call_main(script, cases):
    main = runpy.run_path(script, run_name="jobs_train")["main"]
    results = []
    for args in cases:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                code = main(args)
            except SystemExit as exit:  # a config that does not load: argparse-style exit
                code = exit.code
        results.append({"code": code, "stderr": err.getvalue(), "ray_started": ray.is_initialized()})
    return results


if __name__ == "__main__":
    print("RESULTS " + json.dumps(call_main(sys.argv[1], json.loads(sys.argv[2]))))
"""


def run_train_main(cases: list[list[str]]) -> tuple[list[dict], str]:
    """jobs/train.py's main(args) for each case: exit code, stderr, and whether Ray was started.
    In this process when Ray is not up here yet (the imports are shared with later tests),
    else in a fresh one."""
    import ray

    script = str(ROOT / "jobs" / "train.py")
    if ray.is_initialized():
        env = dict(os.environ, RAY_ADDRESS="local")
        done = subprocess.run([sys.executable, "-c", CALL_MAIN, script, json.dumps(cases)],
                              capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.split("RESULTS ", 1)[1]), done.stderr
    namespace = {"__name__": "call_main"}
    exec(CALL_MAIN, namespace)
    return namespace["call_main"](script, cases), ""


def test_bad_configuration_fails_before_any_ray_work_naming_the_field(tmp_path, monkeypatch):
    """jobs/train.py: every bad configuration exits with code 2 and one `error:` line naming
    the field, without a traceback; Ray is never started and nothing is written."""
    monkeypatch.setenv("RAY_ADDRESS", "local")  # a new local Ray, even if `ray start` left one on this machine
    out = f"train.output_dir={tmp_path / 'runs'}"
    cases = {
        "optim.lrr: unknown key": ["optim.lrr=1"],
        "train.steps: Input should be a valid integer": ["train.steps=many"],
        "runtime.max_staleness: Input should be greater than or equal to 0": ["runtime.max_staleness=-1"],
        "not supported by family 'zimage'; allowed: vlm": ["model.teacher_context=reference"],
        "lower runtime.num_learners": ["runtime.num_learners=64"],  # more learners than this machine has CPUs
        "model.path='/nonexistent/pipeline': no such directory": ["model.tiny=false", "model.path=/nonexistent/pipeline"],
        "data.path='/nonexistent/shards' does not exist": ["data.path=/nonexistent/shards"],
    }
    results, stderr = run_train_main([["--config", str(ROOT / "configs" / "tiny.yaml"), out, *args]
                                      for args in cases.values()])
    for (expected, args), got in zip(cases.items(), results, strict=True):
        assert got["code"] == 2, (args, got)
        assert got["stderr"].startswith("error: ") and expected in got["stderr"], (args, got["stderr"])
        assert not got["ray_started"], args
    assert "Traceback" not in stderr + "".join(r["stderr"] for r in results)
    assert not (tmp_path / "runs").exists()  # no run directory, no MLflow store
