"""Did it work? Numbers for the base and each run, from the same prompts and noise.

    python jobs/evaluate.py --config configs/zimage_turbo_lora.yaml \\
        --export outputs/sft/export --export outputs/dopsd/export --out outputs/eval \\
        eval.prompts=prompts.jsonl eval.reference_steps=32 \\
        eval.clip_path=/models/clip-vit-large-patch14 eval.dino_path=/models/dinov2-base
    python jobs/evaluate.py --run outputs/dopsd        # a run's export and recipe, into its MLflow run
    python jobs/evaluate.py --export outputs/miniature/runs/dopsd-seed0/export --out outputs/eval_toy
        # the toy (the default recipe, configs/toy.yaml): the miniature's scores, and the rest

--export: a run's export folder (LoRA), its LoRA file, or a full fine-tuning transformer
folder; repeat it for several runs. Each is named after its run folder.
--run RUN_DIR: a training run folder; its config.yaml is the recipe (unless --config), its
export the export (unless --export), RUN_DIR/eval the output (unless --out), and the numbers
go into the run's MLflow run. Without --run they go into a new MLflow run in
tracking.experiment (at MLFLOW_TRACKING_URI, tracking.tracking_uri, or SQLite under --out).
What is sampled and scored, and the recipe's eval section: dopsd_ray/evaluation.py and
dopsd_ray/evaluation_job.py. Writes results.json, table.md and samples_<kind>.png to --out and
prints the table. Bad input (a prompt file row, a weights path, an export that does not fit
the base) exits 2 with one `error:` line, before any sampling.
"""

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing, e.g. under `ray job submit`

from dopsd_ray.config import ConfigError  # noqa: E402
from dopsd_ray.recipes import DEFAULT_RECIPE, load_config  # noqa: E402


def export_names(paths: list[str]) -> dict[str, str]:
    """name -> path: the run folder of an export (`<run>/export`, `<run>/export/<lora file>`),
    else the path's own name; made unique, and never "base"."""
    names = {"base": None}
    for path in map(Path, paths):
        parts = path.resolve().parts
        tail = parts[-3] if len(parts) > 2 and parts[-2] == "export" else parts[-2] if parts[-1] == "export" else path.stem
        name = re.sub(r"[^\w.\- ]", "_", tail)  # what MLflow metric keys may hold
        unique, n = name, 2
        while unique in names:
            unique, n = f"{name}-{n}", n + 1
        names[unique] = str(path)
    del names["base"]
    return names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe (default: the run's config.yaml with --run, else configs/toy.yaml)")
    parser.add_argument("--export", action="append", help="an export to evaluate; repeat for several")
    parser.add_argument("--run", help="a training run folder: its export and recipe, logged into its MLflow run")
    parser.add_argument("--out", help="folder for results.json, table.md and the sample grids (default: RUN/eval)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. eval.seeds=[0,1]")
    args = parser.parse_intermixed_args(argv)  # options and overrides in any order

    run_dir = Path(args.run).resolve() if args.run else None
    from dopsd_ray.tracking import RUN_ID_FILE

    if run_dir is not None and not (run_dir / RUN_ID_FILE).is_file():
        parser.exit(2, f"error: --run {args.run}: not a training run folder (no {RUN_ID_FILE})\n")
    exports = args.export or ([str(run_dir / "export")] if run_dir else [])
    if not exports:
        parser.exit(2, "error: give --export PATH (repeatable) or --run RUN_DIR\n")
    if not args.out and run_dir is None:
        parser.exit(2, "error: give --out DIR (or --run RUN_DIR, which writes to RUN_DIR/eval)\n")
    out = Path(args.out).resolve() if args.out else run_dir / "eval"
    try:
        cfg = load_config(args.config or (run_dir / "config.yaml" if run_dir else DEFAULT_RECIPE), args.overrides)
    except ConfigError as err:
        parser.exit(2, f"error: {err}\n")
    if run_dir is not None:  # the run folder as it is now: its tiny base, its MLflow store
        cfg.train.output_dir, cfg.train.run_name = str(run_dir.parent), run_dir.name

    from dopsd_ray.evaluation import markdown_table
    from dopsd_ray.evaluation_job import log_results, run
    from dopsd_ray.families import base_model_path
    from dopsd_ray.tracking import MlflowRun, tracking_uri

    try:
        result = run(cfg, base_model_path(cfg), export_names(exports), out)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(markdown_table(result.summary()))
    if run_dir is not None:
        sink = MlflowRun.attach(tracking_uri(cfg), (run_dir / RUN_ID_FILE).read_text().strip())
        log_results(sink, result, step=cfg.train.steps)
    else:  # a run of its own, its store and id file in --out
        cfg.train.output_dir, cfg.train.run_name = str(out.parent), out.name
        sink = MlflowRun.start_or_resume(cfg)
        log_results(sink, result)
        sink.end("FINISHED")
    print(f"wrote {out / 'results.json'}, {out / 'table.md'}; MLflow run {sink.run_id} at {sink.tracking_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
