"""Config: YAML + overrides, and errors that name the field and what is allowed."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from dopsd_ray.config import ConfigError, flatten
from dopsd_ray.recipes import load_config

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
    assert (cfg.optim.scheduler, cfg.optim.warmup_steps) == ("constant", 0)
    assert cfg.train.steps == 2000 and cfg.train.batch_size * cfg.train.grad_accum * cfg.runtime.num_learners == 4
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
    (["runtime.sync_timeout_s=60", "runtime.replacement_timeout_s=120"], "runtime",
     "replacement_timeout_s=120 > runtime.sync_timeout_s=60"),
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
    code = ("import sys\nfrom dopsd_ray.config import ConfigError\nfrom dopsd_ray.recipes import load_config\n"
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
    else in a fresh one. Not conftest.local_ray: these runs assert that Ray never starts."""
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


# --- Every key in the schema is read somewhere ----------------------------------------------

SOURCE_DIRS = ("dopsd_ray", "jobs")


def _sections():
    from dopsd_ray.config import Config

    return {name: field.annotation for name, field in Config.model_fields.items()}


def config_reads(sources: dict[str, str]) -> set[str]:
    """The `section.key`s that `sources` (path -> Python text) read.

    A read is an attribute load `X.key` (or `getattr(X, "key")`) where X is a section:
      * `C.section` where C is the whole config: a name `cfg`, an attribute `*.cfg`, a name
        annotated `Config`, or `self` in Config's own methods (run_dir);
      * a name bound to a section: assigned from one (`rt = cfg.runtime`), annotated with its
        class (`model: ModelConfig`), or a parameter of a function some call passes a section
        to (`make_weights(..., cfg.lora, ...)` makes `lora_cfg` there a section), found to a
        fixed point across all the sources;
      * `self` in a Section class's own methods, except its validators: a key that is only
        checked against others is still never used.
    An unrelated `.dtype` or `.path` (a tensor's, a model's) does not count.
    """
    sections = _sections()
    by_class = {cls.__name__: name for name, cls in sections.items()}
    trees = {path: ast.parse(text) for path, text in sources.items()}

    # Scopes: each function (or module) with its parent scope and enclosing class name.
    parent, klass, scope_of, functions = {}, {}, {}, {}

    def walk(node, scope, cls):
        for child in ast.iter_child_nodes(node):
            scope_of[child] = scope
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                parent[child], klass[child] = scope, cls
                if not isinstance(child, ast.Lambda):
                    functions.setdefault(child.name, []).append(child)
                walk(child, child, cls)
            elif isinstance(child, ast.ClassDef):
                walk(child, scope, child.name)
            else:
                walk(child, scope, cls)

    for tree in trees.values():
        parent[tree], klass[tree] = None, None
        walk(tree, tree, None)

    def is_validator(fn):
        return any("validator" in ast.unparse(d) for d in getattr(fn, "decorator_list", ()))

    # (scope, name) -> the sections it may hold ("" for the whole config): sets that only grow,
    # so the fixed point below ends even where different calls pass different sections
    aliases: dict = {}

    def lookup(name, scope) -> set:
        while scope is not None:
            if (scope, name) in aliases:
                return aliases[scope, name]
            if name == "self" and klass.get(scope) is not None and parent.get(scope) is not None:
                cls = klass[scope]
                if cls == "Config":
                    return {""}
                if cls in by_class and not is_validator(scope):
                    return {by_class[cls]}
            scope = parent[scope]
        return {""} if name == "cfg" else set()

    def section_of(expr, scope) -> set:
        """The sections `expr` may hold, "" for the whole config; empty for anything else."""
        if isinstance(expr, ast.Name):
            return lookup(expr.id, scope)
        if isinstance(expr, ast.Attribute):
            if expr.attr == "cfg":
                return {""}
            if expr.attr in sections and "" in section_of(expr.value, scope):
                return {expr.attr}
        return set()

    def annotated(arg) -> set:
        if arg.annotation is None:
            return set()
        name = ast.unparse(arg.annotation).strip("'\"").split(".")[-1]
        return {""} if name == "Config" else {by_class[name]} if name in by_class else set()

    for fns in functions.values():
        for fn in fns:
            for arg in [*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs]:
                if found := annotated(arg):
                    aliases[fn, arg.arg] = found

    changed = True
    while changed:
        changed = False

        def bind(key, found: set):
            nonlocal changed
            if found and not found <= aliases.get(key, set()):
                aliases[key] = aliases.get(key, set()) | found
                changed = True

        for tree in trees.values():
            for node in ast.walk(tree):
                scope = scope_of.get(node, tree)
                if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                    bind((scope, node.targets[0].id), section_of(node.value, scope))
                elif isinstance(node, ast.Call):
                    func = node.func
                    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
                    for fn in functions.get(name, ()):
                        params = [*fn.args.posonlyargs, *fn.args.args]
                        if params and params[0].arg in ("self", "cls") and isinstance(func, ast.Attribute):
                            params = params[1:]
                        for param, arg in zip(params, node.args):
                            bind((fn, param.arg), section_of(arg, scope))
                        names = {p.arg for p in [*params, *fn.args.kwonlyargs]}
                        for kw in node.keywords:
                            if kw.arg in names:
                                bind((fn, kw.arg), section_of(kw.value, scope))

    reads = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            scope = scope_of.get(node, tree)
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                section, key = section_of(node.value, scope), node.attr
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
                  and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)):
                section, key = section_of(node.args[0], scope), node.args[1].value
            else:
                continue
            for one in section:
                if one and key in sections[one].model_fields:
                    reads.add(f"{one}.{key}")
    return reads


def _project_sources() -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text() for d in SOURCE_DIRS for p in sorted((ROOT / d).rglob("*.py"))}


def test_every_config_key_is_read_somewhere():
    """A key in the schema that no code reads is a promise the trainer does not keep:
    read it where it belongs, or remove it (from the schema, configs/ and the README)."""
    keys = {f"{s}.{k}" for s, cls in _sections().items() for k in cls.model_fields}
    unread = sorted(keys - config_reads(_project_sources()))
    assert not unread, f"config keys no code in {', '.join(SOURCE_DIRS)}/ reads: {unread}"


def test_config_reads_follows_sections_not_names():
    """The check above counts section reads only: not a tensor's `.dtype`, nor a key only
    its own validator looks at; it follows a section through names and calls."""
    sources = {"a.py": '''
from dopsd_ray.config import ModelConfig

def build(m: ModelConfig):
    return m.variant

def make(lora_cfg, x):
    return lora_cfg.rank, x.alpha

def main(cfg, tensor, model):
    rt = cfg.runtime
    make(cfg.lora, cfg.lora)
    getattr(cfg.optim, "eps")
    return rt.mode, tensor.dtype, model.path, cfg.train.steps, self.cfg.data.repeats
''', "config.py": '''
class TrainConfig(Section):
    seed: int = 0

    @model_validator(mode="after")
    def _check(self):
        return self.seed

class Config(Section):
    @property
    def run_dir(self):
        return self.train.output_dir
'''}
    assert config_reads(sources) == {
        "model.variant", "lora.rank", "lora.alpha", "optim.eps", "runtime.mode", "train.steps", "data.repeats",
        "train.output_dir"}
