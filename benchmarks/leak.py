"""Where the LoRA miniature's concept leaks into the prior, and what stops it (README, "The miniature").

    python benchmarks/leak.py train.steps=120                   # the default variants, magenta, seed 0
    python benchmarks/leak.py --colours magenta --seeds 0 1 --variants dopsd sigma1_only

In-process: the same loss code as the driver (dopsd_ray.algorithms.steps.colocated_loss, or
dopsd_step for a chosen subset of states), the same LoRA weights, AdamW, grad clip and EMA
teacher (dopsd_ray.weights), configs/toy.yaml's settings, but no Ray, DeepSpeed or data
pipeline: batches are drawn at random from the concept's images (data written by
write_concept_dataset, as jobs/miniature.py writes them). Every model is scored like the
miniature: 4-step samples of the toy metric's prompts (dopsd_ray/toy/scoring.py) at eval seed
1000, concept / quality / prior, quality and prior also as x the base.

Variants, each changing one thing from the LoRA setting the leak was found with (`dopsd`:
configs/toy.yaml before this analysis, the toy family's LoRA targets and lr 3e-4):
- which states are trained on: sigma=1 alone (`sigma1_only`), the others (`no_sigma1`);
- which part of the teacher's context it sees: caption tokens masked (`teacher_image_only`),
  image tokens dropped (`teacher_caption_only`: the teacher is the student's EMA on its own context);
- LoRA targets: cross-attention only (`lora_cross`), everything but cross-attention
  (`lora_no_cross`: self-attention, feed-forward, proj_in/out), cross-attention keys and values
  only (`lora_cross_kv`);
- the teacher's EMA speed (`ema_0.9`, `ema_0.9999`), the learning rate (`lr_1e-4`, `lr_1e-3`);
- data: prior-preservation class images (`class_images_10`);
- and SFT at the same settings (`sft`, `sft_class_images_10`, ...);
- the fix, configs/toy.yaml now (`lora_cross_lr_1e-3`, `sft_lora_cross_lr_1e-3`).
Prints a table, writes benchmarks/results/leak.json.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dopsd_ray.algorithms.dopsd import dopsd_step  # noqa: E402
from dopsd_ray.algorithms.steps import Batch, colocated_loss, velocity_fn  # noqa: E402
from dopsd_ray.recipes import load_config  # noqa: E402
from dopsd_ray.families.toy import TOY_BASE_DIR  # noqa: E402
from dopsd_ray.evaluation import Settings, expand, sample_kind  # noqa: E402
from dopsd_ray.families.toy import INFERENCE_STEPS, LORA_TARGETS, ToyContext, ToyFamily  # noqa: E402
from dopsd_ray.toy.concept import Concept, write_concept_dataset  # noqa: E402
from dopsd_ray.toy.evaluator import Evaluator  # noqa: E402
from dopsd_ray.toy.scoring import ToyMetric, toy_prompts  # noqa: E402
from dopsd_ray.weights import EmaTeacher, make_weights  # noqa: E402

CROSS = [f"attn2.{m}" for m in ("to_q", "to_k", "to_v", "to_out.0")]
NO_CROSS = [f"attn1.{m}" for m in ("to_q", "to_k", "to_v", "to_out.0")] + ["ff.net.0.proj", "ff.net.2", "proj_in",
                                                                           "proj_out"]
# The LoRA setting the leak was found with (configs/toy.yaml before this analysis): the toy
# family's preset targets, lr 3e-4. Every variant changes one thing from it.
FORMER = {"targets": LORA_TARGETS, "overrides": ["optim.lr=3e-4"]}
SFT = ["algorithm.name=sft"]
VARIANTS = {
    "dopsd": {},
    "sft": {"overrides": SFT},
    "sigma1_only": {"train_states": [0]},
    "no_sigma1": {"train_states": [1, 2, 3]},
    "teacher_image_only": {"teacher": "image"},
    "teacher_caption_only": {"teacher": "caption"},
    "lora_cross": {"targets": CROSS},
    "lora_no_cross": {"targets": NO_CROSS},
    "ema_0.9": {"overrides": ["algorithm.ema_decay=0.9"]},
    "ema_0.9999": {"overrides": ["algorithm.ema_decay=0.9999"]},
    "lr_1e-4": {"overrides": ["optim.lr=1e-4"]},
    "lr_1e-3": {"overrides": ["optim.lr=1e-3"]},
    "class_images_10": {"class_images": 10},
    "sft_class_images_10": {"overrides": SFT, "class_images": 10},
    "class_images_5": {"class_images": 5},
    "sft_class_images_5": {"overrides": SFT, "class_images": 5},
    "sft_lora_cross": {"overrides": SFT, "targets": CROSS},
    # the fix, configs/toy.yaml now: cross-attention LoRA at lr 1e-3
    "lora_cross_lr_1e-3": {"targets": CROSS, "overrides": ["optim.lr=1e-3"]},
    "sft_lora_cross_lr_1e-3": {"targets": CROSS, "overrides": [*SFT, "optim.lr=1e-3"]},
}
DEFAULT_VARIANTS = ["dopsd", "sft", "sigma1_only", "no_sigma1", "teacher_image_only", "teacher_caption_only",
                    "lora_cross", "lora_no_cross", "ema_0.9", "ema_0.9999", "lr_1e-4", "class_images_10",
                    "sft_class_images_10", "lora_cross_lr_1e-3", "sft_lora_cross_lr_1e-3"]


def load_images(folder: Path) -> tuple[torch.Tensor, list[str]]:
    """The dataset's PNGs in [-1, 1] and their captions, in file order (as the driver reads them)."""
    pngs = sorted(folder.glob("*.png"))
    images = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 127.5 - 1)
                          .permute(2, 0, 1) for p in pngs])
    return images, [p.with_suffix(".txt").read_text().strip() for p in pngs]


def teacher_variant(family: ToyFamily, context: ToyContext, which: str, text_length: int) -> ToyContext:
    """The teacher context with its caption tokens masked ("image") or its image tokens dropped ("caption")."""
    if which == "image":
        mask = context.mask.clone()
        mask[:, :text_length] = False
        return ToyContext(context.features, mask)
    return ToyContext(context.features[:, :text_length], context.mask[:, :text_length])


def train(family: ToyFamily, cfg, images, captions, seed: int, variant: dict):
    """One in-process LoRA training run; returns the weights (student adapter active)."""
    torch.manual_seed(seed)
    weights = make_weights(family.transformer, cfg.lora.model_copy(update={"targets": variant["targets"]}), [])
    opt = torch.optim.AdamW(weights.trainable_parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas,
                            eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    ema = EmaTeacher(weights)
    algo = cfg.algorithm
    sigmas = family.inference_sigmas(INFERENCE_STEPS, 32, 32)
    order = torch.Generator().manual_seed(seed)
    b = cfg.train.batch_size
    for step in range(cfg.train.steps):
        idx = torch.randint(len(images), (b,), generator=order)
        batch = Batch(images[idx], [captions[i] for i in idx], [str(i) for i in idx.tolist()], index=step, seed=seed)
        if algo.name == "sft" or ("train_states" not in variant and "teacher" not in variant):
            loss, _ = colocated_loss(family, weights, batch, sigmas, algo)
        else:
            loss = custom_dopsd_loss(family, weights, batch, sigmas, algo, variant)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(weights.trainable_parameters(), cfg.optim.grad_clip)
        opt.step()
        ema.step(algo.ema_decay)
    return weights


def custom_dopsd_loss(family, weights, batch, sigmas, algo, variant):
    """colocated_loss with a chosen set of trained states and/or a part of the teacher context."""
    gen = batch.generator
    c_s = family.student_context(batch.captions)
    c_t = family.teacher_context(batch.captions, batch.images)
    if "teacher" in variant:
        c_t = teacher_variant(family, c_t, variant["teacher"], c_s.features.shape[1])
    noise = torch.randn(family.latent_shape(len(batch.captions), 32, 32), generator=gen)

    def teacher(x, sigma):
        with weights.teacher() as model:
            return family.velocity(model, x, sigma, c_t)

    out = dopsd_step(velocity_fn(family, weights.model, c_s), teacher, noise, sigmas, algo.loss_space,
                     variant.get("train_states"))
    return out.loss


@torch.no_grad()
def score(family, model, concept: Concept, evaluator: Evaluator) -> dict:
    """The miniature's toy scores of `model` (eval seed 1000, as configs/toy.yaml's eval)."""
    settings = Settings(seeds=[1000], steps=INFERENCE_STEPS, size=32, samples_per_prompt=1, reference_steps=None,
                        batch_size=64)
    texts = expand(toy_prompts(concept), settings)
    samples = {k: sample_kind(family, model, t, [family.student_context(t[i:i + 64]) for i in range(0, len(t), 64)],
                              1000, k, settings) for k, t in texts.items()}
    scores = ToyMetric(evaluator, concept)(samples)
    return {k.removeprefix("toy/"): v for k, v in scores.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--colours", nargs="+", default=["magenta"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    parser.add_argument("--base", default=str(TOY_BASE_DIR))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "leak.json"))
    parser.add_argument("overrides", nargs="*", help="config overrides for every variant, e.g. train.steps=80")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    evaluator = Evaluator.load(Path(args.base) / "evaluator.safetensors")
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    results.setdefault("runs", {})
    base_family = ToyFamily.from_pretrained(args.base)
    for colour in args.colours:
        concept = Concept("sks", colour)
        key = f"{colour}/base"
        if key not in results["runs"]:
            results["runs"][key] = score(base_family, base_family.transformer, concept, evaluator)
        base = results["runs"][key]
        for name in args.variants:
            variant = {**FORMER, **VARIANTS[name], "overrides": [*FORMER["overrides"],
                                                                 *VARIANTS[name].get("overrides", [])]}
            cfg = load_config(ROOT / "configs" / "toy.yaml", [*variant["overrides"], *args.overrides])
            for seed in args.seeds:
                start = time.perf_counter()
                with tempfile.TemporaryDirectory() as tmp:
                    data = write_concept_dataset(Path(tmp), concept, class_images=variant.get("class_images", 0))
                    images, captions = load_images(data)
                family = ToyFamily.from_pretrained(args.base)
                weights = train(family, cfg, images, captions, seed, variant)
                s = score(family, weights.model, concept, evaluator)
                s |= {"quality_x": s["quality"] / base["quality"], "prior_x": s["prior"] / base["prior"],
                      "seconds": time.perf_counter() - start, "targets": variant["targets"],
                      "overrides": [*variant["overrides"], *args.overrides]}
                # the key names the overrides given to every variant (train.steps=120: a longer run)
                results["runs"][f"{colour}/{' '.join([name, *args.overrides])}/seed{seed}"] = s
                print(f"{colour:8s} {name:22s} seed {seed}: concept {s['concept']:.2f}  quality {s['quality_x']:.3f}x"
                      f"  prior {s['prior']:.3f} ({s['prior_x']:.2f}x)  {s['seconds']:.0f} s", flush=True)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(results, indent=1) + "\n")
    print_table(results["runs"])
    return 0


def print_table(runs: dict) -> None:
    print("| colour | variant | seeds | concept | quality x base | prior (x base) |")
    print("|---|---|---|---|---|---|")
    groups = {}
    for key, s in runs.items():
        if key.endswith("/base"):
            continue
        colour, name, _ = key.split("/")
        groups.setdefault((colour, name), []).append(s)
    for (colour, name), ss in groups.items():
        mean = lambda k: sum(s[k] for s in ss) / len(ss)  # noqa: E731
        print(f"| {colour} | {name} | {len(ss)} | {mean('concept'):.2f} | {mean('quality_x'):.3f} | "
              f"{mean('prior'):.3f} ({mean('prior_x'):.2f}x) |")


if __name__ == "__main__":
    sys.exit(main())
