"""The README's "From a folder of images to a LoRA, on one GPU" runs as written.

Every command of that section is taken from the README itself, in order, and run as a
subprocess from a scratch directory that looks like the repository root (jobs/, configs/,
models/ linked in) with `my_images/` holding the bundled sample pairs. Two things are
substituted, and only these: the real model (a tiny random Z-Image pipeline saved to disk,
and the sizes it needs) and the machine (CPU, one thread, two steps). `pip install` is not
run (the test runs inside the installed project); `mlflow ui` is not started, but the store
it names must exist.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## From a folder of images to a LoRA, on one GPU"
REAL_MODEL = "Tongyi-MAI/Z-Image-Turbo"

pytestmark = pytest.mark.slow  # a whole training run plus every job around it: about 3 minutes


def readme_commands() -> list[str]:
    """The section's indented command lines, continuation lines joined."""
    text = (ROOT / "README.md").read_text()
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    commands, current = [], ""
    for line in section.splitlines():
        if not line.startswith("    ") and not current:
            continue
        current += line.strip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.split(" ", 1)[0] in ("python", "pip", "mlflow"):
            commands.append(current)
        current = ""
    return commands


def tiny_overrides(model_dir: Path) -> list[str]:
    """The real model and the GPU machine, swapped for the tiny model and this CPU."""
    return [f"model.path={model_dir}", f"model.teacher_vlm_path={model_dir / 'teacher_vlm'}", "model.dtype=float32",
            "model.max_sequence_length=64", "model.teacher_max_sequence_length=128", "model.vlm_min_pixels=1024",
            "model.vlm_max_pixels=4096", "model.gradient_checkpointing=false", "lora.rank=4", "lora.alpha=8",
            "data.pixel_budget=4096", "train.steps=2", "train.sample_every=1", "train.export_every=1",
            "train.checkpoint_every=2", "runtime.learner_resources={CPU: 1}", "runtime.torch_threads=1"]


def test_the_readme_section_runs_as_written_with_the_tiny_model(tmp_path, tiny_zimage_dir):
    commands = readme_commands()
    jobs = [c for c in commands if c.startswith("python jobs/")]
    assert [c.split()[1] for c in jobs] == ["jobs/prepare_data.py", "jobs/preview_teacher.py", "jobs/plan.py",
                                            "jobs/train.py", "jobs/sample.py"], commands
    for name in ("jobs", "configs", "models", "dopsd_ray"):
        (tmp_path / name).symlink_to(ROOT / name)
    shutil.copytree(ROOT / "data" / "bundled", tmp_path / "my_images")
    env = {**os.environ, "RAY_ADDRESS": "local", "OMP_NUM_THREADS": "1", "PWD": str(tmp_path)}
    env.pop("MLFLOW_TRACKING_URI", None)
    for command in commands:
        if command.startswith("pip "):
            continue
        if command.startswith("mlflow ui"):  # the store it opens must be there
            store = re.search(r"sqlite:///(\S+)", command).group(1).replace("$PWD", str(tmp_path))
            assert Path(store).is_file(), command
            continue
        argv = shlex.split(command)
        argv[0] = sys.executable
        if argv[1] in ("jobs/preview_teacher.py", "jobs/plan.py", "jobs/train.py"):
            argv += tiny_overrides(tiny_zimage_dir)
        if argv[1] == "jobs/sample.py":
            argv[argv.index(REAL_MODEL)] = str(tiny_zimage_dir)
            argv += ["--size", "64", "--max-sequence-length", "64", "--dtype", "float32", "--device", "cpu"]
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    run_dir = tmp_path / "outputs" / "zimage-turbo-lora-1gpu"
    assert (tmp_path / "shards").is_dir() and any((tmp_path / "shards").glob("*.parquet"))
    assert (run_dir / "preview_teacher.png").is_file()
    assert (run_dir / "export" / "pytorch_lora_weights.safetensors").is_file()
    assert (run_dir / "export" / "pytorch_lora_weights_comfyui.safetensors").is_file()
    assert (run_dir / "export" / "step_000001" / "pytorch_lora_weights.safetensors").is_file()
    assert sorted(p.name for p in (run_dir / "samples").glob("step_*.png")) == [
        "step_000000.png", "step_000001.png", "step_000002.png"]
    assert (tmp_path / "samples" / "grid.png").is_file()
