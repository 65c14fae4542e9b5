"""Time to quality on the toy: device-seconds until SFT and D-OPSD first learn the concept
without losing the prior, through the driver, with the miniature's evaluator.

    python benchmarks/quality.py                   # 3 seeds x {SFT, D-OPSD}, 40 steps, an export every 5
    python benchmarks/quality.py --seeds 0 --steps 20 --export-every 10     # a quick look

Each run is jobs/miniature.py's (dopsd_ray.driver.train with configs/toy.yaml: Ray Train +
DeepSpeed, colocated, LoRA r16, batch 4, the same lr and steps for both methods) with
train.export_every: the learner writes a loadable LoRA every N steps. Its device-seconds are
the learner's own step times from MLflow (learner/step_seconds, colocated: no rollout
workers), summed up to each export. One evaluation (dopsd_ray/evaluation_job.py with the toy
metric of dopsd_ray/toy/scoring.py) scores the base and every export at 4 steps.

Reached = concept accuracy >= 0.95 and prior retention >= 0.95x the base's. Reported per
method: the median over seeds of the device-seconds of the first export that reached it
(None when none did), and D-OPSD's scores at the last export within SFT's median
device-seconds to quality.

On this 2-core CPU the default took 7.6 min (6 runs of 40 steps, then one evaluation of the base
and 48 exports), on an otherwise idle machine.
Writes benchmarks/results/quality-<cpu|gpu>.json.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dopsd_ray.recipes import load_config  # noqa: E402
from dopsd_ray.families.toy import TOY_BASE_DIR  # noqa: E402
from dopsd_ray.evaluation import BASE  # noqa: E402
from dopsd_ray.toy.concept import Concept, write_concept_dataset  # noqa: E402

CONCEPT_MIN, PRIOR_MIN = 0.95, 0.95


def first_reached(points: list[dict], base_prior: float) -> dict | None:
    """The first export (by device-seconds) with concept >= 0.95 and prior >= 0.95x base."""
    for p in sorted(points, key=lambda p: p["device_s"]):
        if p["concept"] >= CONCEPT_MIN and p["prior"] >= PRIOR_MIN * base_prior:
            return p
    return None


def device_seconds(summary: dict, steps: list[int]) -> dict[int, float]:
    """Cumulative learner step seconds at each export step, from the run's MLflow history."""
    from mlflow.tracking import MlflowClient

    history = MlflowClient(summary["mlflow_tracking_uri"]).get_metric_history(
        summary["mlflow_run_id"], "learner/step_seconds")
    per_step = {m.step: m.value for m in history}
    return {s: sum(v for k, v in per_step.items() if k <= s) for s in steps}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--export-every", type=int, default=5)
    p.add_argument("--out-dir", default=str(ROOT / "outputs" / "quality"))
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from dopsd_ray import evaluation_job
    from dopsd_ray.driver import train

    out = Path(args.out_dir).resolve()
    data = write_concept_dataset(out / "data", Concept("sks", "yellow", None))
    common = [f"model.path={TOY_BASE_DIR}", f"data.path={data}", f"train.output_dir={out / 'runs'}",
              f"train.steps={args.steps}", f"train.export_every={args.export_every}", "train.log_every=1",
              "train.sample_every=1000000", "train.checkpoint_every=1000000", "eval.at_end=false"]
    started = time.time()
    runs, exports = {}, {}
    for method in ("sft", "dopsd"):
        for seed in args.seeds:
            name = f"{method}-seed{seed}"
            cfg = load_config(ROOT / "configs" / "toy.yaml", [*common, f"algorithm.name={method}",
                                                             f"train.seed={seed}", f"train.run_name={name}"])
            summary = train(cfg)
            steps = list(range(args.export_every, args.steps, args.export_every)) + [args.steps]
            seconds = device_seconds(summary, steps)
            for s in steps:
                folder = Path(summary["export"]) / f"step_{s:06d}" if s < args.steps else Path(summary["export"])
                exports[f"{name}@{s}"] = str(folder)
            runs[name] = {"method": method, "seed": seed, "device_s": seconds}
    cfg = load_config(ROOT / "configs" / "toy.yaml", common)
    scores = evaluation_job.run(cfg, str(TOY_BASE_DIR), exports, out / "eval").summary()
    base_prior = scores[BASE]["toy/prior"]["mean"]
    result = {"args": vars(args), "base": {k: v["mean"] for k, v in scores[BASE].items()}, "runs": {}, "reached": {}}
    for name, run in runs.items():
        points = [{"step": s, "device_s": d, **{k: scores[f"{name}@{s}"][f"toy/{k}"]["mean"]
                                                 for k in ("concept", "prior", "quality")}}
                  for s, d in run["device_s"].items()]
        result["runs"][name] = {**run, "points": points, "reached": first_reached(points, base_prior)}
    for method in ("sft", "dopsd"):
        hits = [r["reached"] for r in result["runs"].values() if r["method"] == method]
        times = [h["device_s"] for h in hits if h]
        result["reached"][method] = {"device_s_median": statistics.median(times) if len(times) == len(hits) else None,
                                     "seeds_reached": len(times), "seeds": len(hits), "device_s": times}
    sft_s = result["reached"]["sft"]["device_s_median"]
    if sft_s is not None:  # D-OPSD at SFT's budget: its last export within it, per seed
        at = []
        for r in result["runs"].values():
            if r["method"] == "dopsd":
                within = [pt for pt in r["points"] if pt["device_s"] <= sft_s]
                at.append(max(within, key=lambda pt: pt["device_s"]) if within else None)
        result["dopsd_at_sft_device_s"] = {"device_s": sft_s, "points": at}
    d = result["reached"]["dopsd"]["device_s_median"]
    result["ratio_dopsd_over_sft"] = d / sft_s if d is not None and sft_s else None
    result["seconds"] = time.time() - started
    path = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / \
        f"quality-{'gpu' if torch.cuda.is_available() else 'cpu'}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps(result["reached"], indent=1), f"\nD-OPSD / SFT device-seconds to quality: "
          f"{result['ratio_dopsd_over_sft']}\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
