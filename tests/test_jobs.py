"""The user-facing entry scripts, each run as a subprocess: jobs/sample.py, jobs/preview_teacher.py,
jobs/build_toy_base.py and jobs/miniature.py (jobs/train.py: tests/test_job_submit.py and
tests/test_config.py; jobs/prepare_data.py: tests/test_data.py)."""

import importlib.util
import json
import math
import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dopsd_ray.algorithms.sampling import euler_sample
from dopsd_ray.algorithms.steps import velocity_fn
from dopsd_ray.families.zimage import LORA_TARGETS, PIPELINE_CLASS, STOCK_SAMPLING, ZImageFamily
from dopsd_ray.grid import MIN_CELL, PAD
from dopsd_ray.weights import FullWeights, LoraWeights

ROOT = Path(__file__).resolve().parents[1]
SIZE, SEED = 32, 3
PROMPT = "a red circle on a white background"


def run_job(script, *args, timeout=300):
    """jobs/<script> in a fresh process. One that needs Ray (preview_teacher.py, miniature.py)
    starts its own local instance there (RAY_ADDRESS=local, from conftest: even where `ray
    start` left one); this module has no local_ray, so no Ray of the tests runs beside it."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "jobs" / script), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] (1, 3, H, W) -> uint8 (H, W, 3), rounded as the pipeline's postprocess does."""
    x = (images[0] / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy()
    return (x * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def lora_export(tiny_zimage_dir, tmp_path_factory):
    """A perturbed student LoRA exported like a run's export, plus in-process samples of it and of the base."""
    family = ZImageFamily.from_pretrained(tiny_zimage_dir)
    weights = LoraWeights(family.transformer, LORA_TARGETS, rank=4, alpha=8)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in weights.trainable_parameters():  # the teacher adapter keeps the init: the base model
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    path = weights.export(tmp_path_factory.mktemp("export") / "lora", PIPELINE_CLASS)

    noise = torch.randn(family.latent_shape(1, SIZE, SIZE), generator=torch.Generator().manual_seed(SEED))
    sigmas = family.inference_sigmas(STOCK_SAMPLING["num_inference_steps"], SIZE, SIZE)
    context = family.student_context([PROMPT])
    student = family.decode_latents(euler_sample(velocity_fn(family, weights.model, context), noise, sigmas))
    with weights.teacher() as base_model:
        base = family.decode_latents(euler_sample(velocity_fn(family, base_model, context), noise, sigmas))
    return path, to_uint8(student), to_uint8(base)


def test_sample_with_lora_matches_the_student_in_process(tiny_zimage_dir, lora_export, tmp_path):
    path, student, base = lora_export
    assert np.abs(student.astype(int) - base.astype(int)).max() > 10  # the LoRA changes the image
    args = ["--model", tiny_zimage_dir, "--family", "zimage", "--size", SIZE, "--seed", SEED, "--prompt", PROMPT]
    r = run_job("sample.py", *args, "--prompt", "a blue square", "--lora", path.parent, "--out", tmp_path / "a")
    assert r.returncode == 0, r.stderr[-3000:]
    pngs = sorted((tmp_path / "a").glob("*.png"))
    assert [p.name for p in pngs] == ["00_a_red_circle_on_a_white_background.png", "01_a_blue_square.png", "grid.png"]
    assert str(tmp_path / "a" / "grid.png") in r.stdout
    image = np.asarray(Image.open(pngs[0]).convert("RGB"))
    assert image.shape == (SIZE, SIZE, 3)
    assert np.abs(image.astype(int) - student.astype(int)).max() <= 2

    # the .safetensors file instead of its folder (in process: one subprocess start is enough)
    sample_job = runpy.run_path(str(ROOT / "jobs" / "sample.py"))
    assert sample_job["main"]([*map(str, args), "--lora", str(path), "--out", str(tmp_path / "b")]) == 0
    image = np.asarray(Image.open(tmp_path / "b" / pngs[0].name).convert("RGB"))
    assert np.abs(image.astype(int) - student.astype(int)).max() <= 2


def test_sample_with_a_full_transformer_export(tiny_zimage_dir, lora_export, tmp_path, capsys):
    _, _, base = lora_export
    weights = FullWeights(ZImageFamily.from_pretrained(tiny_zimage_dir).transformer)  # untrained: the base
    export = weights.export(tmp_path / "full")
    sample_job = runpy.run_path(str(ROOT / "jobs" / "sample.py"))
    args = ["--model", str(tiny_zimage_dir), "--size", str(SIZE), "--seed", str(SEED), "--prompt", PROMPT,
            "--transformer", str(export), "--out", str(tmp_path / "out")]
    assert sample_job["main"](["--family", "zimage", *args]) == 0
    image = np.asarray(Image.open(tmp_path / "out" / "00_a_red_circle_on_a_white_background.png").convert("RGB"))
    assert np.abs(image.astype(int) - base.astype(int)).max() <= 2
    # a Z-Image transformer under the klein family: refused before any weights load
    assert sample_job["main"](["--family", "flux2_klein", *args]) == 2
    assert "holds a ZImageTransformer2DModel, but --family flux2_klein needs" in capsys.readouterr().err


def test_sample_errors_name_the_problem(tiny_zimage_dir, lora_export, tmp_path):
    path, _, _ = lora_export
    common = ["--model", tiny_zimage_dir, "--prompt", PROMPT, "--out", tmp_path / "x"]
    cases = [
        (["--family", "zimage", "--lora", tmp_path / "missing"], "--lora .*missing: no such file"),
        (["--family", "zimage", "--lora", path, "--transformer", path.parent], "not both"),
        (["--family", "sdxl", "--lora", path], "unknown --family 'sdxl'"),
        (["--family", "zimage"], "--lora DIR_OR_FILE"),
        (["--family", "zimage", "--transformer", tmp_path], "no config.json"),
    ]
    for args, message in cases:
        r = run_job("sample.py", *common, *args, timeout=60)
        assert r.returncode == 2 and re.search(message, r.stderr), (args, r.stderr)
    assert not (tmp_path / "x").exists()


@pytest.mark.slow  # a whole job in a subprocess (30-60 s on 2 cores)
def test_preview_teacher_writes_a_three_row_grid(tmp_path):
    out = tmp_path / "preview.png"
    r = run_job("preview_teacher.py", "--config", ROOT / "configs" / "tiny.yaml", "--num", 2, "--out", out,
                f"train.output_dir={tmp_path}", "model.tiny=true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert str(out) in r.stdout and "D-OPSD cannot teach it" in r.stdout
    gaps = re.findall(r"teacher +([\d.]+) +student +([\d.]+)", r.stdout)
    assert len(gaps) == 2 and all(0 <= float(g) <= 255 for pair in gaps for g in pair)
    assert (tmp_path / "tiny-dopsd" / "tiny_model" / "model_index.json").is_file()  # built where the trainer builds it

    w, h = map(int, re.search(r"2 training pairs at (\d+)x(\d+)", r.stdout).groups())
    scale = max(1, math.ceil(MIN_CELL / min(w, h)))
    cell_w, cell_h = w * scale, h * scale
    grid = Image.open(out)
    top = grid.height - PAD - 3 * (cell_h + PAD)  # caption strip: 1 to 4 lines of text
    assert PAD < top < cell_h // 2, (grid.size, cell_h)
    left = grid.width - PAD - 2 * (cell_w + PAD)  # row labels
    assert 0 < left < 200, (grid.size, cell_w)


def test_preview_teacher_errors_name_the_problem(tmp_path):
    r = run_job("preview_teacher.py", f"train.output_dir={tmp_path}", "model.family=sdxl", timeout=60)
    assert r.returncode == 2 and "model.family" in r.stderr, r.stderr
    r = run_job("preview_teacher.py", "--num", 0, timeout=60)
    assert r.returncode == 2 and "--num must be at least 1" in r.stderr, r.stderr
    r = run_job("preview_teacher.py", f"train.output_dir={tmp_path}", f"data.path={tmp_path / 'nope'}", timeout=60)
    assert r.returncode == 2 and "data.path" in r.stderr and "does not exist" in r.stderr, r.stderr[-2000:]


@pytest.mark.slow  # a whole job in a subprocess (30-60 s on 2 cores)
def test_build_toy_base_writes_a_loadable_base(tmp_path):
    """jobs/build_toy_base.py at a few seconds per stage, with the committed evaluator (it is
    reused when the output folder has one; training one takes minutes)."""
    from dopsd_ray.families.toy import TOY_BASE_DIR
    from dopsd_ray.families.toy import ToyFamily

    out = tmp_path / "toy"
    out.mkdir()
    shutil.copy(TOY_BASE_DIR / "evaluator.safetensors", out)
    r = run_job("build_toy_base.py", "--out", out, "--flow-minutes", 0.02, "--distill-minutes", 0.02,
                "--pool-size", 64, "--batch-size", 8, "--threads", 1, "--figure-samples", 8)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"wrote {out}" in r.stdout
    figures = json.loads((out / "base_figures.json").read_text())
    assert figures["flow_steps"] > 0 and figures["distill_steps"] > 0
    for model in ("flow", "distilled"):
        assert 0 <= figures[model]["4_steps"]["accuracy"] <= 1
    assert Image.open(out / "base_samples.png").width > 0
    family = ToyFamily.from_pretrained(out)  # the student, as the trainer loads models/toy
    assert family.transformer is not None and (out / "flow" / "model_index.json").is_file()

    r = run_job("build_toy_base.py", "--out", tmp_path / "x", "--figure-samples", 4, timeout=60)
    assert r.returncode == 2 and "--figure-samples must be at least 8" in r.stderr, r.stderr[-2000:]


@pytest.mark.slow  # a whole job in a subprocess (30-60 s on 2 cores)
def test_miniature_trains_and_scores_one_method(tmp_path):
    """jobs/miniature.py: D-OPSD on the committed toy base for 2 steps, one seed, through the
    real driver (its own local Ray in the subprocess), then scored by the evaluation job
    (jobs/evaluate.py's) against the base, and the teacher context."""
    out = tmp_path / "mini"
    r = run_job("miniature.py", "--methods", "dopsd", "--seeds", 0, "--threads", 1, "--out", out,
                "train.steps=2", "train.sample_every=1000", "train.checkpoint_every=1000")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert {"base", "teacher", "dopsd"} <= results.keys() and "sft" not in results
    assert results["overrides"] == ["train.steps=2", "train.sample_every=1000", "train.checkpoint_every=1000"]
    # the numbers are the evaluation job's (its toy evaluator metric), base and run scored in one call
    evaluation = json.loads((out / "eval" / "results.json").read_text())
    assert list(evaluation["scores"]) == ["base", "dopsd-seed0"]
    for metric in ("concept", "quality", "confidence", "prior"):
        assert len(results["dopsd"][metric]["runs"]) == 1 and 0 <= results["dopsd"][metric]["mean"] <= 1
        assert results["dopsd"][metric]["runs"] == [evaluation["scores"]["dopsd-seed0"][f"toy/{metric}"]["mean"]]
        assert results["base"][metric] == evaluation["scores"]["base"][f"toy/{metric}"]["mean"]
    assert evaluation["scores"]["dopsd-seed0"]["prior_drift/ssim"]["per_seed"]  # and the evaluation's own numbers
    assert (out / "runs" / "dopsd-seed0" / "export").is_dir()
    assert Image.open(out / "samples.png").width > 0
    assert not (out / "table.md").exists()  # the table compares both methods


# -- jobs/miniature.py --sweep colours: its summary and table, in-process ----------------------

def load_miniature():
    spec = importlib.util.spec_from_file_location("miniature_job", ROOT / "jobs" / "miniature.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def concept_results(seeds, base_prior, dopsd_prior, sft_concept=(1.0, 1.0, 1.0), overrides=()):
    """One colour's miniature results.json as run_concept writes it (base quality 0.8)."""
    def method(concept, quality, prior):
        return {m: {"mean": sum(v) / len(v), "std": 0.0, "runs": list(v)}
                for m, v in (("concept", concept), ("quality", quality), ("confidence", (0.9,) * 3), ("prior", prior))}
    return {"class_images": 0, "overrides": list(overrides), "seeds": list(seeds),
            "base": {"concept": 0.0, "quality": 0.8, "confidence": 0.9, "prior": base_prior},
            "teacher": {"concept": 1.0, "quality": 0.8},
            "sft": method(sft_concept, (0.8, 0.76, 0.8), (base_prior,) * 3),
            "dopsd": method((1.0, 1.0, 1.0), (0.8, 0.8, 0.72), dopsd_prior)}


def test_miniature_sweep_summarises_every_colour_and_names_the_misses(tmp_path, capsys):
    """--sweep colours with every colour's results already on disk (the same settings): it trains
    nothing, reuses them, and reports per colour the mean and worst seed, x base, and the misses."""
    miniature = load_miniature()
    colours = list(miniature.world.COLOURS)
    out = tmp_path / "sweep"
    seeds = [0, 1, 5]
    for i, colour in enumerate(colours):
        leak = colour == "magenta"  # one colour's D-OPSD prior falls on its second seed
        results = concept_results(seeds, base_prior=1.0, dopsd_prior=(1.0, 0.5 if leak else 1.0, 0.97),
                                  sft_concept=(1.0, 0.7, 0.8) if colour == "cyan" else (1.0, 1.0, 1.0),
                                  overrides=[*miniature.SWEEP_OVERRIDES, "train.steps=3"])
        (out / colour).mkdir(parents=True)
        (out / colour / "results.json").write_text(json.dumps(results))
    assert miniature.main(["--sweep", "colours", "--seeds", *map(str, seeds), "--out", str(out), "--threads", "1",
                           "train.steps=3"]) == 0
    assert capsys.readouterr().out.count("reusing") == len(colours)

    summary = json.loads((out / "sweep_colours.json").read_text())
    assert list(summary["concepts"]) == colours
    magenta = summary["concepts"]["magenta"]["dopsd"]
    assert magenta["prior_x"]["worst"] == 0.5 and magenta["prior_x"]["worst_seed"] == 1
    assert magenta["prior_x"]["mean"] == pytest.approx((1.0 + 0.5 + 0.97) / 3)
    assert magenta["quality_x"]["worst"] == pytest.approx(0.9) and magenta["quality_x"]["worst_seed"] == 5
    dopsd = summary["overall"]["dopsd"]
    assert dopsd["prior_x"]["worst_concept"] == "magenta"
    assert dopsd["prior_x"]["worst_run"] == {"concept": "magenta", "seed": 1, "value": 0.5}
    assert dopsd["prior_x"]["mean"] == pytest.approx((5 * 0.99 + (2.47 / 3)) / 6)
    assert summary["overall"]["sft"]["concept"]["worst_concept"] == "cyan"
    assert summary["misses"] == ["magenta D-OPSD: prior_x 0.823 < 0.95", "cyan SFT: concept 0.833 < 0.9"]

    table = (out / "sweep_colours_table.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| magenta |"))
    assert "0.82x (0.50x s1)" in row and row.count("|") == 9  # concept, base prior, 3 columns per method
    assert "Misses: " in table and "magenta D-OPSD" in table

    # results of other settings (here: without train.steps=3) are not reused: red is run again,
    # which here stops at the missing base, after its concept data is written
    (out / "red" / "results.json").write_text(json.dumps(concept_results(seeds, 1.0, (1.0,) * 3)))
    with pytest.raises(FileNotFoundError, match="evaluator.safetensors"):
        miniature.main(["--sweep", "colours", "--seeds", *map(str, seeds), "--out", str(out), "--threads", "1",
                        "--base", str(tmp_path / "no_base"), "train.steps=3"])
    assert (out / "red" / "data" / "concept.json").is_file() and not (out / "green" / "data").exists()
