"""Sample grids and intermediate exports, in process: the learner's own methods on a tiny
Z-Image (no Ray: one rank, LocalContext, DeepSpeed at stage 0). The same paths run end to end in
tests/test_runtime.py::test_colocated_dopsd_logs_metrics_grid_and_exports."""

import math
from pathlib import Path

import pytest
import torch
from diffusers import ZImageTransformer2DModel
from PIL import Image

from dopsd_ray.config import ConfigError
from dopsd_ray.recipes import load_config
from dopsd_ray.grid import EMPTY, MIN_CELL, PAD
from dopsd_ray.learner import Learner, LearnerInputs
from dopsd_ray.learner.context import LocalContext
from dopsd_ray.preview import BASE_FILE, load_base, validation_set
from dopsd_ray.storage import Storage
from dopsd_ray.tracking import ListSink
from dopsd_ray.weights import STUDENT, state_dict

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
PAIRS = (["a red circle on a blue background", "a green square"],
         torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1)


def grid_cells(path, rows: int, cols: int, side: int) -> list[list[Image.Image]]:
    """The cells of a sample_grid PNG of square `side`-pixel images, by row and column."""
    grid = Image.open(path).convert("RGB")
    cell = side * max(1, math.ceil(MIN_CELL / side))
    x0, y0 = grid.width - cols * (cell + PAD), grid.height - rows * (cell + PAD)  # after the label strips
    assert 0 < x0 < 220 and 0 < y0 < cell, (grid.size, rows, cols)
    return [[grid.crop((x0 + c * (cell + PAD), y0 + r * (cell + PAD), x0 + c * (cell + PAD) + cell,
                        y0 + r * (cell + PAD) + cell)) for c in range(cols)] for r in range(rows)]


def is_empty(cell: Image.Image) -> bool:
    return cell.getextrema() == tuple((v, v) for v in EMPTY)


def bare_learner(tmp_path, model_dir, *overrides, pairs=PAIRS) -> Learner:
    """A rank-0 learner of one in this process (no Ray), logging into a ListSink."""
    cfg = load_config(TINY, [f"train.output_dir={tmp_path}", "runtime.zero_stage=0", *overrides])
    inputs = LearnerInputs(cfg.model_dump(mode="json"), str(model_dir), validation=validation_set(cfg, pairs),
                           tracking=ListSink())
    return Learner(inputs, LocalContext(tmp_path / "checkpoints", {"train": []})).setup()


def test_columns_seeds_and_sizes(tmp_path):
    cfg = load_config(TINY, ["train.seed=7"])
    val = validation_set(cfg, PAIRS)
    assert val.prompts == [*cfg.train.validation_prompts, *PAIRS[0]] and len(cfg.train.validation_prompts) == 2
    assert val.seeds == [7, 8, 9, 10] and val.pairs == 2 and (val.height, val.width) == (64, 64)
    assert validation_set(load_config(TINY, ["train.validation_prompts=[]"]), None) is None
    with pytest.raises(ValueError, match="set train.sample_size"):
        validation_set(cfg, None)
    with pytest.raises(ConfigError, match=r"train.sample_size=40 is not a multiple of 16.*use e.g. 32"):
        load_config(TINY, ["train.sample_size=40"])  # the family's PIXEL_MULTIPLE, at load time
    val = validation_set(load_config(TINY, ["train.sample_size=48"]), PAIRS)
    assert (val.height, val.width) == (48, 48)
    val.check_size(16)
    with pytest.raises(ValueError, match=r"not a multiple of 32.*train.sample_size to a multiple of 32, e.g. 32"):
        val.check_size(32)  # the loaded model's pixel_multiple, checked again by the learner


def test_lora_base_row_is_the_step0_student_and_a_resumed_run_gets_it_back(tmp_path, tiny_zimage_dir):
    learner = bare_learner(tmp_path, tiny_zimage_dir)
    samples = tmp_path / "tiny-dopsd" / "samples"
    learner.log_samples()  # step 0
    learner.step = 2
    with torch.no_grad():  # a trained student: LoRA B away from its zero init
        for name, p in learner.weights.named_parameters(STUDENT):
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.05)
    learner.log_samples()
    assert list(learner.reporter.mlflow.images) == ["samples/step_000000.png", "samples/step_000002.png"]
    grids = [grid_cells(samples / f"step_{s:06d}.png", 4, 4, 64) for s in (0, 2)]
    for rows in grids:  # teacher and training image cells in the training-pair columns only
        assert [[is_empty(c) for c in row] for row in rows[2:]] == [[True, True, False, False]] * 2
    assert all(grids[0][0][c].tobytes() == grids[0][1][c].tobytes() for c in range(4))  # step 0: student = base
    assert all(grids[0][0][c].tobytes() == grids[1][0][c].tobytes() for c in range(4))  # base row kept
    assert all(grids[0][1][c].tobytes() != grids[1][1][c].tobytes() for c in range(4))  # the student moved

    # a resumed run reads the base row back; without the file, samples it with the adapters off
    saved = load_base(Storage(samples), BASE_FILE, learner.validation, learner.cfg.algorithm.inference_steps)
    assert saved.dtype == torch.uint8 and saved.shape == (4, 3, 64, 64)
    assert torch.equal(learner.resumed_base(), saved)
    (samples / BASE_FILE).unlink()
    assert torch.equal(learner.resumed_base(), saved)  # LoRA B = 0 adds exactly nothing
    assert all(p.requires_grad for p in learner.weights.trainable_parameters())  # the student is back
    other = validation_set(load_config(TINY, ["train.validation_prompts=[a cross]"]), PAIRS)
    assert load_base(Storage(samples), BASE_FILE, other, learner.cfg.algorithm.inference_steps) is None


def test_full_finetuning_exports_every_step_folder_and_resumes_without_a_base_row(tmp_path, tiny_zimage_dir, capsys):
    learner = bare_learner(tmp_path, tiny_zimage_dir, "lora.enabled=false", "train.export_every=2")
    run = tmp_path / "tiny-dopsd"
    learner.step = 2
    learner.export(final=False)
    with torch.no_grad():
        next(iter(learner.weights.model.parameters())).add_(1.0)
    learner.step = 4
    learner.export(final=True)
    assert not (run / "export" / "step_000004" / "step_000002").exists()
    loaded = {d: ZImageTransformer2DModel.from_pretrained(str(run / "export" / d)).state_dict()
              for d in ("step_000002", "step_000004", ".")}
    now = state_dict(learner.weights)
    assert all(torch.equal(loaded["step_000004"][k], now[k]) and torch.equal(loaded["."][k], now[k]) for k in now)
    assert any(not torch.equal(loaded["step_000002"][k], now[k]) for k in now)
    logged = sorted({a for _, a in learner.reporter.mlflow.artifacts})
    assert logged == ["export", "export/step_000002", "export/step_000004"]
    assert all(not p.endswith("step_000002") for p, a in learner.reporter.mlflow.artifacts if a == "export")  # files only

    assert learner.resumed_base() is None  # no base file, no base weights
    assert "no base row" in capsys.readouterr().out
