"""Look at the teacher before training: can the model render your concept in context?

    python jobs/preview_teacher.py                                      # the toy model and its concept images
    python jobs/preview_teacher.py --config configs/zimage_turbo_lora.yaml data.path=/data/shards --num 8

D-OPSD can only teach what the teacher (the same model given caption + target image)
already renders (docs/method.md, "Known failure modes"). This draws N training pairs,
samples each at the family's few-step setting (train.sample_size) from the fresh weights
(LoRA at its initialisation = the base model, teacher = student) twice, with the same noise:
from the caption alone (what the student does now) and from the teacher context. It writes
the grid training runs draw (dopsd_ray/preview.py), rows student / teacher / training image,
and prints per pair how far each sample is from its target (mean absolute pixel difference,
0-255).

Overrides are section.key=value (YAML values), as for jobs/train.py.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing, e.g. under `ray job submit`

from dopsd_ray.recipes import config_from_cli  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=4, help="training pairs to preview (default 4)")
    parser.add_argument("--out", help="PNG to write (default: <run dir>/preview_teacher.png)")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    args, cfg = config_from_cli(parser, argv)
    if args.num < 1:
        parser.error(f"--num must be at least 1, got {args.num}")

    from dopsd_ray.data.stream import StreamSpec, read_shards, bundled_dataset_path, take_validation

    data_path = cfg.data.path or bundled_dataset_path()
    missing = [p for p in ([data_path] if isinstance(data_path, str) else data_path)
               if "://" not in p and not Path(p).exists()]
    if missing:  # before loading anything heavy
        print(f"error: data.path {', '.join(missing)} does not exist", file=sys.stderr)
        return 2

    import ray
    import torch

    from dopsd_ray.families import base_model_path, load_family, lora_targets
    from dopsd_ray.jobenv import init_ray, wants_local_ray
    from dopsd_ray.preview import pixel_gaps, student_samples, teacher_samples, validation_grid, validation_set
    from dopsd_ray.storage import Storage, local_copy
    from dopsd_ray.weights import make_weights

    if cfg.runtime.torch_threads:
        torch.set_num_threads(cfg.runtime.torch_threads)
    # --out, else the run's folder (a path, or an object store: storage.Storage)
    out_dir, out_name = (str(Path(args.out).resolve().parent), Path(args.out).name) if args.out else (
        cfg.run_dir, "preview_teacher.png")

    # 1. the model, with fresh weights: the student is the base model, the teacher equals it
    model_path = base_model_path(cfg)
    try:
        family = load_family(cfg.model, local_copy(model_path), device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (OSError, ValueError) as err:
        print(f"error: cannot load model {model_path!r} (model.path): {err}", file=sys.stderr)
        return 2
    weights = make_weights(family.transformer, cfg.lora, lora_targets(cfg.model.family))

    # 2. N training pairs of one bucket, read like the trainer reads them
    if not ray.is_initialized():  # the cluster named by RAY_ADDRESS, or a small local Ray
        init_ray() if not wants_local_ray() else init_ray(address="local", num_cpus=2, include_dashboard=False,
                                                         log_to_driver=False)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # as the trainer: the pairs its sample grids show
    context.enable_progress_bars = False
    try:
        dataset, _ = read_shards(data_path, StreamSpec.from_config(cfg, family.pixel_multiple))
        validation = take_validation(dataset, cfg, count=args.num)
    except (OSError, ValueError) as err:
        print(f"error: cannot read training pairs from {data_path!r} (data.path): {err}", file=sys.stderr)
        return 2
    if validation is None:
        print(f"error: no usable training pairs in {data_path!r} (data.path)", file=sys.stderr)
        return 2
    val = validation_set(cfg, validation, prompts=[])  # the training pairs alone
    try:
        val.check_size(family.pixel_multiple)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    captions, images = validation

    # 3. student (caption only) and teacher-context samples, same noise, few-step setting
    steps = cfg.algorithm.inference_steps
    student = student_samples(family, weights.model, val, steps)
    teacher = teacher_samples(family, weights, val, steps)
    grid = validation_grid(val, student, teacher, f"student = base ({steps} steps)")
    out = Storage(out_dir).write_with(out_name, lambda p: grid.save(p, format="PNG"))

    print(f"teacher preview: {out}")
    print(f"  {len(captions)} training pairs at {images.shape[-1]}x{images.shape[-2]}, sampled at "
          f"{val.width}x{val.height}, {steps} steps; rows: student from the caption alone / teacher context "
          "(caption + training image) / training image")
    print("  How to read it: if the teacher row does not show your concept, D-OPSD cannot teach it "
          "(the teacher is the ceiling); fix the data or the teacher context before training.")
    print("  mean abs pixel difference to the target (0-255; a teacher much closer than the student "
          "= the teacher can render it):")
    for caption, t_gap, s_gap in zip(captions, pixel_gaps(teacher, images), pixel_gaps(student, images)):
        print(f"    teacher {t_gap:6.1f}   student {s_gap:6.1f}   {caption[:60]!r}")
    if len(captions) < args.num:
        print(f"  (asked for {args.num} pairs; the most common bucket held {len(captions)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
