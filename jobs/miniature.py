"""The miniature of the paper: Base vs SFT vs D-OPSD on the toy world, at 4 steps.

    python jobs/miniature.py                                  # sks = anything yellow, 3 seeds
    python jobs/miniature.py --token ohwx --colour cyan --shape cross --seeds 0 1
    # every colour of the world as the concept, 3 seeds each (README, "Every colour"), resumable:
    python jobs/miniature.py --sweep colours --out outputs/miniature_sweep
    # full fine-tuning, the same 10 class images for both methods (README, second table):
    python jobs/miniature.py --class-images 10 lora.enabled=false optim.lr=3e-4 algorithm.ema_decay=0.9999 train.steps=200

For each method and seed it trains through the framework's normal entry point
(dopsd_ray.driver.train with configs/toy.yaml: local Ray, Ray Train + DeepSpeed, MLflow),
with the same steps and learning rate, then evaluates the base and every run's export (LoRA
file or UNet folder) in one call of the evaluation job (dopsd_ray/evaluation_job.py, what
jobs/evaluate.py runs; its eval section in configs/toy.yaml), whose toy evaluator metric
(dopsd_ray/toy/scoring.py) scores 4-step samples:
- concept accuracy: held-out prompts "a sks on a <background not seen in training>",
  the concept's colour (and shape, when it has one) right;
- 4-step quality: palette share (falls when samples blur) and classifier confidence;
- prior retention: accuracy on held-in prompts of the world that do not show the concept.
The teacher row (base model, caption + target image tokens) is the method's ceiling.
Writes results JSON, a markdown table and a sample grid to --out, and the evaluation's own
results.json, table.md (with few-step retention, prior drift, sharpness) and grids to --out/eval.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dopsd_ray.recipes import load_config  # noqa: E402
from dopsd_ray.families.toy import TOY_BASE_DIR  # noqa: E402
from dopsd_ray.evaluation import BASE, markdown_table  # noqa: E402
from dopsd_ray import evaluation_job  # noqa: E402
from dopsd_ray.families.toy import INFERENCE_STEPS, ToyFamily  # noqa: E402
from dopsd_ray.grid import sample_grid  # noqa: E402
from dopsd_ray.toy import world  # noqa: E402
from dopsd_ray.toy.build import render_items, sample  # noqa: E402
from dopsd_ray.toy.concept import Concept, write_concept_dataset  # noqa: E402
from dopsd_ray.toy.evaluator import Evaluator  # noqa: E402
from dopsd_ray.toy.scoring import SAMPLES_PER_PROMPT, concept_scores, quality_scores  # noqa: E402

METRICS = ("concept", "quality", "confidence", "prior")
METHOD_NAMES = {"sft": "SFT", "dopsd": "D-OPSD"}
SCORES = ("concept", "concept_background", "quality", "confidence", "prior")  # the toy metric's, toy/<score>


def heldout_items(concept: Concept) -> list[world.Item]:
    return [i for i in concept.heldout_items for _ in range(SAMPLES_PER_PROMPT["heldout"])]


def teacher_score(family: ToyFamily, evaluator: Evaluator, concept: Concept, seed: int = 1000) -> dict:
    """The base model given the teacher context (concept prompt + a training image): the ceiling."""
    heldout = heldout_items(concept)
    train = concept.train_items
    targets = render_items([train[i % len(train)] for i in range(len(heldout))], torch.Generator().manual_seed(seed))
    ctx = family.teacher_context([concept.prompt(i.background) for i in heldout], targets)
    samples = sample(family, family.transformer, ctx, INFERENCE_STEPS, seed)
    return {**concept_scores(evaluator, samples, concept, heldout), **quality_scores(evaluator, samples)}


def toy_scores(summary: dict, model: str) -> dict:
    """A model's toy scores from the evaluation (one evaluation seed: its mean is its value)."""
    return {k: summary[model][f"toy/{k}"]["mean"] for k in SCORES}


def summarise(runs: list[dict]) -> dict:
    out = {}
    for k in runs[0]:
        values = [r[k] for r in runs]
        out[k] = {"mean": statistics.mean(values), "std": statistics.pstdev(values), "runs": values}
    return out


def table(results: dict, base: dict) -> str:
    lines = ["| model (4 steps) | concept accuracy | quality (palette share) | confidence | prior retention |",
             "|---|---|---|---|---|"]
    lines.append(f"| Base | {base['concept']:.2f} | {base['quality']:.3f} | {base['confidence']:.3f} | {base['prior']:.2f} |")
    t = results["teacher"]
    lines.append(f"| Teacher context (base + image) | {t['concept']:.2f} | {t['quality']:.3f} | {t['confidence']:.3f} | - |")
    for name in ("sft", "dopsd"):
        s = results[name]
        cells = " | ".join(f"{s[m]['mean']:.3f} ± {s[m]['std']:.3f}" for m in METRICS)
        lines.append(f"| {METHOD_NAMES[name]} | {cells} |")
    lines.append("")
    q, p = base["quality"], base["prior"]
    for name in ("sft", "dopsd"):
        s = results[name]
        lines.append(f"{name}: quality {s['quality']['mean'] / q:.2f}x base, prior {s['prior']['mean'] / max(p, 1e-9):.2f}x base")
    return "\n".join(lines)


def run_concept(args, concept: Concept, out: Path, overrides: list[str]) -> dict:
    """Train every method and seed on one concept through the driver, score them in one
    evaluation; write results.json, table.md and samples.png to `out`; return the results."""
    data = write_concept_dataset(out / "data", concept, class_images=args.class_images)
    evaluator = Evaluator.load(Path(args.base) / "evaluator.safetensors")

    family = ToyFamily.from_pretrained(args.base)
    teacher = teacher_score(family, evaluator, concept)
    print(f"teacher context: {teacher}", flush=True)
    if teacher["concept"] < 0.5:
        print(f"WARNING: the base model given the image renders this concept in only "
              f"{teacher['concept']:.0%} of samples: D-OPSD cannot teach what its teacher cannot show "
              "(docs/method.md, 'Known failure modes').", flush=True)

    from dopsd_ray.driver import train

    common = [f"model.path={args.base}", f"data.path={data}", f"train.output_dir={out / 'runs'}"]
    exports = {}
    for method in args.methods:
        for seed in args.seeds:
            cfg = load_config(ROOT / "configs" / "toy.yaml", [
                *common, f"algorithm.name={method}", f"train.seed={seed}", f"train.run_name={method}-seed{seed}",
                *overrides])
            exports[f"{method}-seed{seed}"] = train(cfg)["export"]

    # every run's export and the base, scored in one evaluation (the toy evaluator is one of its metrics)
    cfg = load_config(ROOT / "configs" / "toy.yaml", [*common, *overrides])
    evaluation = evaluation_job.run(cfg, args.base, exports, out / "eval")
    summary = evaluation.summary()
    print(markdown_table(summary), flush=True)
    base = toy_scores(summary, BASE)
    results = {"concept": vars(concept) | {"heldout_backgrounds": concept.heldout_backgrounds},
               "class_images": args.class_images, "overrides": overrides, "seeds": args.seeds,
               "base": base, "teacher": teacher}
    for method in args.methods:
        results[method] = summarise([toy_scores(summary, f"{method}-seed{seed}") for seed in args.seeds])

    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    if set(args.methods) == {"sft", "dopsd"}:
        md = table(results, base)
        (out / "table.md").write_text(md + "\n")
        print(md)
    rows, labels = [list(render_items(concept.train_items * 2, torch.Generator())[:8])], ["training images"]
    for name, label in [(BASE, "Base"), *[(f"{m}-seed{args.seeds[0]}", METHOD_NAMES[m]) for m in args.methods]]:
        previews = evaluation.previews[name]
        rows += [list(previews["heldout"]), list(previews["prior"])]
        labels += [f"{label}: '{concept.token}' held-out", f"{label}: held-in prompts"]
    sample_grid(rows, labels, [""] * 8).save(out / "samples.png")
    print(f"wrote {out / 'results.json'}, {out / 'samples.png'}")
    return results


# -- the sweep: every colour of the world as the concept ----------------------------------------

# Intermediate sample grids and checkpoints cost time and change nothing the sweep scores (they
# draw no numbers from the training's generators: the same exports either way).
SWEEP_OVERRIDES = ["train.sample_every=1000", "train.checkpoint_every=1000"]
# The miniature's targets (README): concept >= 0.9, quality and prior >= 0.95x the base, per concept
# as a mean over seeds.
TARGETS = {"concept": 0.9, "quality_x": 0.95, "prior_x": 0.95}
SWEEP_METRICS = ("concept", "quality", "prior", "quality_x", "prior_x")


def per_seed(results: dict, method: str) -> dict[str, list[float]]:
    """A concept's runs of one method: each metric per seed, quality and prior also as x its base."""
    runs = {m: results[method][m]["runs"] for m in ("concept", "quality", "prior")}
    runs["quality_x"] = [v / results["base"]["quality"] for v in runs["quality"]]
    runs["prior_x"] = [v / max(results["base"]["prior"], 1e-9) for v in runs["prior"]]
    return runs


def summarise_sweep(by_concept: dict[str, dict]) -> dict:
    """Per concept and method: mean and worst seed of each metric; per method: the mean over
    concepts, the worst concept (by its mean over seeds), the worst single run; and every
    concept whose mean misses a target."""
    concepts, overall, misses = {}, {}, []
    for name, results in by_concept.items():
        seeds = results["seeds"]
        concepts[name] = {"base": results["base"], "teacher": results["teacher"]}
        for method in METHOD_NAMES:
            if method not in results:
                continue
            runs = per_seed(results, method)
            row = {}
            for m, values in runs.items():
                worst = min(range(len(values)), key=values.__getitem__)
                row[m] = {"mean": statistics.mean(values), "worst": values[worst], "worst_seed": seeds[worst],
                          "runs": values}
            concepts[name][method] = row
            misses += [f"{name} {METHOD_NAMES[method]}: {m} {row[m]['mean']:.3f} < {t}"
                       for m, t in TARGETS.items() if row[m]["mean"] < t]
    for method in METHOD_NAMES:
        rows = {name: c[method] for name, c in concepts.items() if method in c}
        if not rows:
            continue
        overall[method] = {}
        for m in SWEEP_METRICS:
            worst = min(rows, key=lambda name: rows[name][m]["mean"])
            seed_worst = min(rows, key=lambda name: rows[name][m]["worst"])
            overall[method][m] = {
                "mean": statistics.mean(r[m]["mean"] for r in rows.values()),
                "worst_concept": worst, "worst_concept_mean": rows[worst][m]["mean"],
                "worst_run": {"concept": seed_worst, "seed": rows[seed_worst][m]["worst_seed"],
                              "value": rows[seed_worst][m]["worst"]}}
    return {"targets": TARGETS, "concepts": concepts, "overall": overall, "misses": misses}


def sweep_table(summary: dict) -> str:
    """Per concept: concept accuracy, quality x base, prior x base for SFT and D-OPSD, each the
    mean over seeds with the worst seed in brackets; then the mean over concepts and the worst."""
    methods = [m for m in ("sft", "dopsd") if m in summary["overall"]]
    head = [f"{METHOD_NAMES[m]} {label}" for m in methods for label in ("concept", "quality x base", "prior x base")]
    lines = ["| concept | base prior | " + " | ".join(head) + " |", "|---" * (2 + len(head)) + "|"]
    cell = {"concept": "{:.2f}", "quality_x": "{:.2f}x", "prior_x": "{:.2f}x"}
    for name, c in summary["concepts"].items():
        cells = [f"{cell[m].format(c[meth][m]['mean'])} ({cell[m].format(c[meth][m]['worst'])} "
                 f"s{c[meth][m]['worst_seed']})" for meth in methods for m in cell]
        lines.append(f"| {name} | {c['base']['prior']:.2f} | " + " | ".join(cells) + " |")
    o = summary["overall"]
    lines.append("| **mean** | | " + " | ".join(cell[m].format(o[meth][m]["mean"]) for meth in methods for m in cell)
                 + " |")
    lines.append("| **worst concept** | | " + " | ".join(
        f"{cell[m].format(o[meth][m]['worst_concept_mean'])} {o[meth][m]['worst_concept']}"
        for meth in methods for m in cell) + " |")
    lines.append("")
    lines.append("Each cell: mean over seeds (worst seed: its value, sN = seed N). Targets per concept: concept >= {concept}, quality and "
                 "prior >= {quality_x}x base.".format(**summary["targets"]))
    lines.append("Misses: " + ("; ".join(summary["misses"]) if summary["misses"] else "none") + ".")
    return "\n".join(lines)


def sweep_colours(args, out: Path) -> dict:
    """Every colour of the world (or --colours) as the concept (the token bound to it, any
    shape), each in out/<colour> like a single miniature; a colour whose results.json has these settings is
    reused (a sweep that stopped resumes). Writes out/sweep_colours.json and _table.md."""
    overrides = [*SWEEP_OVERRIDES, *args.overrides]
    by_colour = {}
    for colour in args.colours or world.COLOURS:
        done = out / colour / "results.json"
        previous = json.loads(done.read_text()) if done.is_file() else {}
        settings = {"class_images": args.class_images, "overrides": overrides, "seeds": args.seeds}
        if all(previous.get(k) == v for k, v in settings.items()) and all(m in previous for m in args.methods):
            print(f"{colour}: reusing {done}", flush=True)
            by_colour[colour] = previous
        else:
            by_colour[colour] = run_concept(args, Concept(args.token, colour, args.shape), out / colour, overrides)
    summary = summarise_sweep(by_colour) | {"class_images": args.class_images, "overrides": overrides,
                                             "seeds": args.seeds}
    (out / "sweep_colours.json").write_text(json.dumps(summary, indent=2) + "\n")
    md = sweep_table(summary)
    (out / "sweep_colours_table.md").write_text(md + "\n")
    print(md)
    print(f"wrote {out / 'sweep_colours.json'}, {out / 'sweep_colours_table.md'}")
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--token", default="sks")
    parser.add_argument("--colour", default="yellow")
    parser.add_argument("--shape", default=None, help="default: none, the concept is the colour on any shape")
    parser.add_argument("--sweep", choices=["colours"], default=None,
                        help="colours: every colour of the world as the concept, one after another (--colour unused)")
    parser.add_argument("--colours", nargs="+", choices=list(world.COLOURS), default=None,
                        help="--sweep colours: only these, in this order (default: every colour of the world)")
    parser.add_argument("--class-images", type=int, default=0,
                        help="DreamBooth prior preservation: renders of other world items added to the training data")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["sft", "dopsd"], choices=["sft", "dopsd"])
    parser.add_argument("--base", default=str(TOY_BASE_DIR))
    parser.add_argument("--out", default="outputs/miniature")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for sampling and scoring here")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. train.steps=100")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()
    if args.sweep == "colours":
        sweep_colours(args, out)
    else:
        run_concept(args, Concept(args.token, args.colour, args.shape), out, args.overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
