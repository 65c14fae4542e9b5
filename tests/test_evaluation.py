"""The evaluation: its metrics' invariances, CLIP / DINO plumbing with tiny random models saved
and loaded the way users' folders are, jobs/evaluate.py end to end on the tiny Z-Image family
and on a toy run (whose numbers are the miniature's former scoring loop's), and bad input.
eval.at_end through the driver: tests/test_runtime.py (the colocated run evaluates itself)."""

import json
import re
import runpy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file, save_file

from dopsd_ray.recipes import load_config
from dopsd_ray.families.toy import TOY_BASE_DIR, TOY_CONCEPT_DIR
from dopsd_ray.embeddings import Embedder, PromptAlignment, ReferenceSimilarity, frechet_distance
from dopsd_ray.evaluation import (
    BASE, NOISE_STREAM, PSNR_CAP, Samples, high_frequency_energy, load_prompts, mse, psnr, ssim,
)
from dopsd_ray.grid import tensor_to_pil
from dopsd_ray.tracking import MlflowRun

ROOT = Path(__file__).resolve().parents[1]
EVALUATE = runpy.run_path(str(ROOT / "jobs" / "evaluate.py"))["main"]


def images(n: int, seed: int = 0, side: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# -- metrics ------------------------------------------------------------------------------------

def test_pixel_metrics_invariances():
    a = images(4)
    b = (a + 0.2 * torch.randn(a.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    assert torch.equal(mse(a, a), torch.zeros(4)) and torch.equal(psnr(a, a), torch.full((4,), PSNR_CAP))
    torch.testing.assert_close(ssim(a, a), torch.ones(4))
    assert (mse(a, b) > 0).all() and (psnr(a, b) < PSNR_CAP).all() and (ssim(a, b) < 0.99).all()
    torch.testing.assert_close(ssim(a, b), ssim(b, a))
    perm = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(ssim(a[perm], b[perm]), ssim(a, b)[perm])  # per image, whatever the batch order
    # flat images: variances 0, so SSIM is the luminance term (2 m1 m2 + C1) / (m1^2 + m2^2 + C1)
    m1, m2 = 0.25, 0.75  # in [0, 1]; the images are in [-1, 1]
    flat = ssim(torch.full((1, 3, 16, 16), 2 * m1 - 1), torch.full((1, 3, 16, 16), 2 * m2 - 1))
    torch.testing.assert_close(flat, torch.tensor([(2 * m1 * m2 + 1e-4) / (m1 ** 2 + m2 ** 2 + 1e-4)]))
    # blur lowers the high-frequency energy of every image
    blurred = F.avg_pool2d(a, 3, stride=1, padding=1, count_include_pad=False)
    assert (high_frequency_energy(blurred) < 0.5 * high_frequency_energy(a)).all()


def test_frechet_distance_is_zero_for_one_set_and_the_mean_shift_for_a_shifted_one():
    x = torch.randn(300, 3, generator=torch.Generator().manual_seed(0))
    assert abs(frechet_distance(x, x)) < 1e-6
    shift = torch.tensor([1.0, 2.0, 2.0])
    assert frechet_distance(x, x + shift) == pytest.approx(9.0, abs=1e-6)  # same covariance: |shift|^2


# -- CLIP / DINO plumbing with tiny random models ---------------------------------------------

WORDS = ["a", "on", "background", "red", "blue", "yellow", "circle", "square", "sks", "white", "black", "gray"]


def tiny_clip(path: Path) -> Path:
    """A random CLIPModel with a word-level tokenizer and CLIP's image processor, save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(path)
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=16, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def tiny_dino(path: Path, version: int) -> Path:
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model, DINOv3ViTConfig, DINOv3ViTModel

    shape = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=2)
    torch.manual_seed(version)
    model = Dinov2Model(Dinov2Config(**shape)) if version == 2 else DINOv3ViTModel(DINOv3ViTConfig(**shape))
    model.save_pretrained(path)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def scorers(tmp_path_factory):
    root = tmp_path_factory.mktemp("scorers")
    return {"clip": tiny_clip(root / "clip"), "dinov2": tiny_dino(root / "dinov2", 2),
            "dinov3": tiny_dino(root / "dinov3", 3)}


def samples_of(batch: torch.Tensor, prompts: list[str]) -> Samples:
    return Samples(prompts, batch, torch.zeros(len(batch), 1))


def test_clip_and_dino_scores_from_tiny_saved_models(scorers, tmp_path):
    batch, prompts = images(3), ["a red circle", "a sks on a gray background", "a blue square"]
    perm = torch.tensor([2, 0, 1])
    clip = Embedder.from_pretrained(str(scorers["clip"]), "eval.clip_path")
    for name in ("dinov2", "dinov3"):
        dino = Embedder.from_pretrained(str(scorers[name]), "eval.dino_path")
        assert dino.images(batch).shape == (3, 32)
        with pytest.raises(ValueError, match="has no text tower"):
            PromptAlignment(dino)({"prior": samples_of(batch, prompts)})
    for model in (clip, dino):
        embeddings = model.images(batch)
        torch.testing.assert_close(model.images(batch[perm]), embeddings[perm])  # no mixing across a batch
        # an image against itself as the only training image: similarity 1
        same = ReferenceSimilarity(model, [tensor_to_pil(batch[0])], "clip_i")
        assert same({"heldout": samples_of(batch[:1], prompts[:1])})["clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert clip.images(batch).shape == (3, 16) and clip.texts(prompts).shape == (3, 16)
    torch.testing.assert_close(clip.texts([prompts[i] for i in perm]), clip.texts(prompts)[perm])
    clip_t = PromptAlignment(clip)
    score = clip_t({"prior": samples_of(batch, prompts)})["clip_t"]
    assert -1 <= score <= 1
    assert clip_t({"prior": samples_of(batch[perm], [prompts[i] for i in perm])})["clip_t"] == pytest.approx(score)
    assert clip_t({"prior": samples_of(batch, prompts[::-1])})["clip_t"] != pytest.approx(score)  # pairs matter

    with pytest.raises(ValueError, match=r"eval.dino_path='.*nope': no such directory"):
        Embedder.from_pretrained(str(tmp_path / "nope"), "eval.dino_path")
    with pytest.raises(ValueError, match="has no config.json"):
        Embedder.from_pretrained(str(tmp_path), "eval.clip_path")


def test_prompt_files_and_their_bad_rows(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text('{"kind": "heldout", "prompt": "a sks dog", "samples": 3}\n\n{"kind": "prior", "prompt": "a cat"}\n')
    assert [(p.kind, p.text, p.samples) for p in load_prompts(good)] == [("heldout", "a sks dog", 3), ("prior", "a cat", None)]
    text = tmp_path / "p.txt"
    text.write_text("# comment\ntrain: a sks dog on a rug\nprior:  a cat \n")
    assert [(p.kind, p.text) for p in load_prompts(text)] == [("train", "a sks dog on a rug"), ("prior", "a cat")]
    cases = [("b.jsonl", '{"kind": "prior", "prompt": "x"}\n{"kind": "prior"', r"b.jsonl:2: not a JSON object"),
             ("c.jsonl", '{"kind": "concept", "prompt": "x"}', r"c.jsonl:1: kind 'concept' is not one of train, heldout"),
             ("d.jsonl", '{"kind": "prior", "prompt": ""}', r"d.jsonl:1: the prompt must be a non-empty string"),
             ("e.jsonl", '{"kind": "prior", "prompt": "x", "samples": 0}', r"e.jsonl:1: samples must be a whole number"),
             ("f.jsonl", '{"kind": "prior", "text": "x"}', r"f.jsonl:1: expected \{\"kind\""),
             ("g.txt", "train: fine\na prompt without its kind", r"g.txt:2: expected 'kind: prompt'"),
             ("h.txt", "# nothing\n", "holds no prompts")]
    for name, body, message in cases:
        (tmp_path / name).write_text(body)
        with pytest.raises(ValueError, match=message):
            load_prompts(tmp_path / name)
    with pytest.raises(ValueError, match="no such file"):
        load_prompts(tmp_path / "missing.txt")


# -- jobs/evaluate.py on the tiny Z-Image family -----------------------------------------------

PROMPTS = "train: a red circle on a white background\nheldout: a sks on a gray background\nprior: a blue square\n"


@pytest.fixture(scope="module")
def zimage_exports(tiny_zimage_dir, tmp_path_factory):
    """<run>/export folders: an untrained LoRA (B = 0: the base), a perturbed one, and a full
    fine-tuning export of the untrained transformer (the base again)."""
    from dopsd_ray.families.zimage import LORA_TARGETS, PIPELINE_CLASS, ZImageFamily
    from dopsd_ray.weights import FullWeights, LoraWeights

    root = tmp_path_factory.mktemp("zimage_runs")
    weights = LoraWeights(ZImageFamily.from_pretrained(tiny_zimage_dir).transformer, LORA_TARGETS, rank=4, alpha=8)
    weights.export(root / "zero" / "export", PIPELINE_CLASS)
    with torch.no_grad():
        for p in weights.trainable_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    weights.export(root / "lora" / "export", PIPELINE_CLASS)
    FullWeights(ZImageFamily.from_pretrained(tiny_zimage_dir).transformer, with_teacher=False).export(root / "full" / "export")
    (root / "prompts.txt").write_text(PROMPTS)
    return root


def zimage_args(tiny_zimage_dir, root, out, *extra):
    return ["--config", str(ROOT / "configs" / "tiny.yaml"), "--out", str(out), "model.tiny=false",
            f"model.path={tiny_zimage_dir}", f"train.output_dir={root}", f"eval.prompts={root / 'prompts.txt'}",
            "eval.seeds=[1,2]", "eval.samples_per_prompt=1", "eval.steps=2", "eval.size=32", "eval.batch_size=2",
            *extra]


def test_evaluate_job_on_tiny_zimage_exports(tiny_zimage_dir, zimage_exports, scorers, tmp_path, capsys):
    root, out = zimage_exports, tmp_path / "eval"
    exports = [f"--export={root / name / 'export'}" for name in ("zero", "lora", "full")]
    args = zimage_args(tiny_zimage_dir, root, out, "eval.reference_steps=4", f"eval.clip_path={scorers['clip']}",
                       f"eval.dino_path={scorers['dinov2']}", f"eval.fid_path={scorers['dinov3']}")
    assert EVALUATE([*exports, *args]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "results.json").read_text())
    scores = report["scores"]
    assert list(scores) == [BASE, "zero", "lora", "full"] and report["models"]["lora"] == str(root / "lora" / "export")
    assert "| metric | base | zero | lora | full |" in printed and (out / "table.md").read_text() in printed + "\n"
    for model, s in scores.items():
        for key in ("retention/latent_mse", "retention/ssim", "sharpness", "clip_t", "clip_i", "dino", "fd"):
            assert len(s[key]["per_seed"]) == 2, (model, key)
        assert 0 < s["retention/mse"]["mean"] and s["retention/psnr"]["mean"] < PSNR_CAP  # 2 steps are not 4
    assert "prior_drift/mse" not in scores[BASE] and scores[BASE]["sharpness"]["mean"] == 1
    for same in ("zero", "full"):  # the base again: no drift, same sharpness, same scores
        assert scores[same]["prior_drift/latent_mse"]["mean"] == 0 and scores[same]["prior_drift/psnr"]["mean"] == PSNR_CAP
        assert scores[same]["sharpness"]["mean"] == pytest.approx(1.0)
        assert scores[same]["clip_t"]["per_seed"] == pytest.approx(scores[BASE]["clip_t"]["per_seed"], abs=1e-6)
    assert scores["lora"]["prior_drift/mse"]["mean"] > 1e-4 and scores["lora"]["prior_drift/ssim"]["mean"] < 1
    for kind in ("train", "heldout", "prior"):
        assert (out / f"samples_{kind}.png").is_file()

    # logged into a new MLflow run whose store is in --out
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    run_id = (out / "mlflow_run_id.txt").read_text().strip()
    metrics = client.get_run(run_id).data.metrics
    assert metrics["eval/lora/prior_drift/mse"] == pytest.approx(scores["lora"]["prior_drift/mse"]["mean"])
    assert metrics["eval/base/clip_i_std"] == pytest.approx(scores[BASE]["clip_i"]["std"])
    assert {a.path for a in client.list_artifacts(run_id, "eval")} >= {"eval/results.json", "eval/table.md"}


def test_evaluate_job_on_a_tiny_flux2_klein_lora(tmp_path):
    """The other real family: a perturbed LoRA drifts from the base on the prior prompt."""
    from dopsd_ray.families.flux2_klein import LORA_TARGETS, PIPELINE_CLASS, Flux2KleinFamily, build_tiny_flux2_klein
    from dopsd_ray.weights import LoraWeights

    model = build_tiny_flux2_klein(tmp_path / "klein")
    weights = LoraWeights(Flux2KleinFamily.from_pretrained(model).transformer, LORA_TARGETS, rank=4, alpha=8)
    with torch.no_grad():
        for p in weights.trainable_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    weights.export(tmp_path / "klein-lora" / "export", PIPELINE_CLASS)
    (tmp_path / "prompts.txt").write_text(PROMPTS)
    out = tmp_path / "eval"
    assert EVALUATE(["--config", str(ROOT / "configs" / "tiny.yaml"), "--out", str(out),
                     f"--export={tmp_path / 'klein-lora' / 'export'}", "model.tiny=false", "model.family=flux2_klein",
                     f"model.path={model}", "model.max_sequence_length=160", "algorithm.training_sigmas=inference",
                     f"train.output_dir={tmp_path}", f"eval.prompts={tmp_path / 'prompts.txt'}", "eval.seeds=[1]",
                     "eval.samples_per_prompt=1", "eval.steps=2", "eval.size=32", "eval.batch_size=2"]) == 0
    scores = json.loads((out / "results.json").read_text())["scores"]
    assert list(scores) == [BASE, "klein-lora"]
    assert scores["klein-lora"]["prior_drift/mse"]["mean"] > 0 and scores[BASE]["sharpness"]["mean"] == 1


def test_bad_input_fails_with_one_line_before_any_sampling(tiny_zimage_dir, zimage_exports, tmp_path, capsys):
    root = zimage_exports
    lora = root / "lora" / "export" / "pytorch_lora_weights.safetensors"
    foreign = load_file(str(lora))
    save_file({"transformer.no_such_block.lora_A.weight": torch.zeros(4, 8)}, str(tmp_path / "foreign.safetensors"))
    key = next(k for k in foreign if k.endswith("lora_A.weight"))
    save_file({**foreign, key: torch.zeros(4, foreign[key].shape[1] + 1)}, str(tmp_path / "wide.safetensors"))
    other = tmp_path / "other"
    other.mkdir()
    config = json.loads((root / "full" / "export" / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "n_layers": config["n_layers"] + 1}))
    (tmp_path / "bad.txt").write_text("train: fine\nheldout a sks dog\n")
    export = f"--export={root / 'lora' / 'export'}"
    cases = [
        ([export, f"eval.clip_path={tmp_path / 'nope'}"], r"eval.clip_path='.*nope': no such directory"),
        ([f"--export={tmp_path / 'foreign.safetensors'}"], r"LoRA module 'no_such_block' is not in the base's ZImageTransformer2DModel"),
        ([f"--export={tmp_path / 'wide.safetensors'}"], rf"{key} has shape \(4, \d+\), but the base's .* has weight"),
        ([f"--export={other}"], r"its transformer has n_layers=\d+, the base n_layers=\d+: another model"),
        ([f"--export={tmp_path / 'missing'}"], r"export .*missing: no such file or directory"),
        ([export, f"eval.prompts={tmp_path / 'bad.txt'}"], r"bad.txt:2: expected 'kind: prompt'"),
    ]
    for extra, message in cases:
        out = tmp_path / "out"
        assert EVALUATE([*zimage_args(tiny_zimage_dir, root, out), *extra]) == 2, extra
        captured = capsys.readouterr()
        errors = [line for line in captured.err.splitlines() if line.startswith("error")]  # (beside progress bars)
        assert len(errors) == 1 and errors[0].startswith("error: ") and re.search(message, errors[0]), captured.err
        assert "eval base" not in captured.out and not (out / "results.json").exists()  # nothing was sampled


# -- the toy: the miniature's numbers -----------------------------------------------------------

def test_toy_evaluation_reproduces_the_miniature_scoring(tmp_path):
    """jobs/evaluate.py --run on a toy run (the committed base, a LoRA export) gives, for both, the
    numbers of the miniature's former scoring loop (sampled here directly, the student in-process),
    and logs them into the run."""
    from dopsd_ray.families import lora_targets
    from dopsd_ray.families.toy import INFERENCE_STEPS, ToyFamily, ToyPipeline
    from dopsd_ray.toy.build import sample
    from dopsd_ray.toy.concept import Concept, prior_items
    from dopsd_ray.toy.evaluator import Evaluator, evaluate
    from dopsd_ray.toy.scoring import SAMPLES_PER_PROMPT, concept_scores, quality_scores
    from dopsd_ray.weights import LoraWeights

    family = ToyFamily.from_pretrained(TOY_BASE_DIR)
    weights = LoraWeights(family.transformer, lora_targets("toy"), rank=4, alpha=4)
    with torch.no_grad():
        for p in weights.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    weights.export(tmp_path / "run" / "export", ToyPipeline)  # the folder of a run named "run"

    concept, evaluator = Concept.load(TOY_CONCEPT_DIR), Evaluator.load(TOY_BASE_DIR / "evaluator.safetensors")
    heldout = [i for i in concept.heldout_items for _ in range(SAMPLES_PER_PROMPT["heldout"])]
    prior = [i for i in prior_items(concept) for _ in range(SAMPLES_PER_PROMPT["prior"])]
    def scores(model):
        c = sample(family, model, family.student_context([concept.prompt(i.background) for i in heldout]),
                   INFERENCE_STEPS, 1000 + NOISE_STREAM["heldout"])
        p = sample(family, model, family.student_context([i.caption for i in prior]), INFERENCE_STEPS,
                   1000 + NOISE_STREAM["prior"])
        return {**concept_scores(evaluator, c, concept, heldout), **quality_scores(evaluator, torch.cat([c, p])),
                "prior": evaluate(evaluator, p, prior)["accuracy"]}

    with weights.teacher() as base:  # the teacher adapter still holds the init: the base
        expected = {BASE: scores(base)}
    expected["run"] = scores(weights.model)

    # a run folder as the driver leaves it (recipe, export, MLflow run), evaluated with --run
    run_dir = tmp_path / "run"
    cfg = load_config(ROOT / "configs" / "toy.yaml", [f"train.output_dir={tmp_path}", "train.run_name=run",
                                                     "train.steps=7"])
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    mlflow = MlflowRun.start_or_resume(cfg)
    mlflow.end()
    assert EVALUATE(["--run", str(run_dir)]) == 0
    summary = json.loads((run_dir / "eval" / "results.json").read_text())["scores"]
    for name in (BASE, "run"):
        got = {k.removeprefix("toy/"): v["mean"] for k, v in summary[name].items() if k.startswith("toy/")}
        assert got == pytest.approx(expected[name], abs=1e-6), name
    assert summary["run"]["prior_drift/mse"]["mean"] > 0
    client = MlflowClient(mlflow.tracking_uri)
    history = client.get_metric_history(mlflow.run_id, "eval/run/toy/concept")
    assert [(m.step, m.value) for m in history] == [(7, summary["run"]["toy/concept"]["mean"])]
    assert {a.path for a in client.list_artifacts(mlflow.run_id, "eval")} == {
        "eval/results.json", "eval/table.md", "eval/samples_heldout.png", "eval/samples_prior.png"}


def test_a_run_that_evaluates_at_the_end_checks_its_eval_inputs_before_training(tmp_path):
    from dopsd_ray.config import ConfigError
    from dopsd_ray.preflight import preflight

    (tmp_path / "bad.jsonl").write_text('{"kind": "heldout"}\n')
    for override, message in ((f"eval.prompts={tmp_path / 'bad.jsonl'}", r"bad.jsonl:1: the prompt must be"),
                              (f"eval.dino_path={tmp_path / 'none'}", r"eval.dino_path='.*none': no such directory")):
        cfg = load_config(ROOT / "configs" / "toy.yaml", ["eval.at_end=true", override])
        with pytest.raises(ConfigError, match=message):
            preflight(cfg)
        preflight(load_config(ROOT / "configs" / "toy.yaml", [override]))  # not evaluating: not its business
