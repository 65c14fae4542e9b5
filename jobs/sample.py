"""Sample from exported weights with the STOCK diffusers pipeline: what users deploy.

    python jobs/sample.py --model Tongyi-MAI/Z-Image-Turbo --family zimage \\
        --lora outputs/dopsd/export --prompt "a red fox in the snow" --out samples/
    python jobs/sample.py --model black-forest-labs/FLUX.2-klein-4B --family flux2_klein \\
        --transformer outputs/full/export --prompt "..." --prompt "..." --out samples/

--lora: the LoRA export of a run (its folder or the .safetensors file), loaded with the
pipeline's load_lora_weights. --transformer: a full fine-tuning export (a transformer
folder), loaded with the family's transformer class and passed into the pipeline.
Sampling uses the family's few-step setting (STOCK_SAMPLING in its file: Z-Image-Turbo
8 steps without CFG, klein 4 steps at guidance 1.0). Every prompt gets the noise of
--seed (a CPU generator), so one image is reproducible from its prompt and seed alone.
Writes NN_<prompt>.png per prompt and grid.png into --out.
"""

import argparse
import inspect
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing, e.g. under `ray job submit`

from dopsd_ray.exports import class_problem, lora_problem, transformer_problem  # noqa: E402

FAMILIES = ("zimage", "flux2_klein")  # the families with a stock diffusers pipeline (the toy has none)


def stock_sampling(family: str) -> dict:
    """The family's deployed sampling defaults (guidance_scale, num_inference_steps)."""
    from dopsd_ray.families import family_module

    return dict(family_module(family).STOCK_SAMPLING)


def check_args(args) -> str | None:
    """The first problem with the arguments, as a message, or None."""
    if args.family not in FAMILIES:
        return f"unknown --family {args.family!r}; known: {', '.join(FAMILIES)}"
    if args.lora and args.transformer:
        return "give either --lora (a LoRA export) or --transformer (a full fine-tuning export), not both"
    if not args.lora and not args.transformer:
        return "give the weights to sample: --lora DIR_OR_FILE (LoRA export) or --transformer DIR (full export)"
    problem = lora_problem(args.lora) if args.lora else transformer_problem(args.transformer)  # exactly one is set
    if problem:
        return f"--{'lora' if args.lora else 'transformer'} {problem}"
    if args.steps is not None and args.steps < 1:
        return f"--steps must be at least 1, got {args.steps}"
    if args.size < 16:
        return f"--size must be at least 16 pixels, got {args.size}"
    return None


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit] or "prompt"


def load_pipeline(args, dtype):
    """The stock pipeline of the family with the exported weights in it."""
    from dopsd_ray.families import pipeline_class

    pipe_cls = pipeline_class(args.family)
    kwargs = {}
    if args.transformer:
        # the pipeline's own transformer class (its __init__ annotation), loaded from the export
        transformer_cls = inspect.signature(pipe_cls).parameters["transformer"].annotation
        problem = class_problem(args.transformer, transformer_cls.__name__, f"--family {args.family}")
        if problem:
            raise ValueError(f"--transformer {problem}")
        kwargs["transformer"] = transformer_cls.from_pretrained(args.transformer, dtype=dtype)
    pipe = pipe_cls.from_pretrained(args.model, dtype=dtype, **kwargs)
    if args.lora:
        lora = Path(args.lora)
        if lora.is_file():
            pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
        else:
            pipe.load_lora_weights(str(lora))
    return pipe.to(args.device)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="base pipeline: hub id or local directory")
    parser.add_argument("--family", required=True, help=f"model family: {' | '.join(FAMILIES)}")
    parser.add_argument("--lora", help="LoRA export: folder or .safetensors file")
    parser.add_argument("--transformer", help="full fine-tuning export: transformer folder")
    parser.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    parser.add_argument("--steps", type=int, help="default: the family's few-step setting (zimage 8, klein 4)")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (default 1024)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-sequence-length", type=int, default=512, help="prompt tokens (the pipelines' default)")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--out", required=True, help="folder for the PNGs and grid.png")
    args = parser.parse_args(argv)
    problem = check_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2

    import torch

    from dopsd_ray.grid import sample_grid

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    sampling = stock_sampling(args.family)
    if args.steps is not None:
        sampling["num_inference_steps"] = args.steps
    try:
        pipe = load_pipeline(args, dtype)
    except (OSError, ValueError) as err:
        print(f"error: cannot load --model {args.model!r} with the given weights: {err}", file=sys.stderr)
        return 2

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images = []
    for i, prompt in enumerate(args.prompt):
        generator = torch.Generator("cpu").manual_seed(args.seed)  # same noise on any device
        try:
            image = pipe(prompt=prompt, height=args.size, width=args.size, generator=generator,
                         max_sequence_length=args.max_sequence_length, **sampling).images[0]
        except ValueError as err:  # e.g. a size the pipeline cannot make
            print(f"error: {err}", file=sys.stderr)
            return 2
        path = out / f"{i:02d}_{slug(prompt)}.png"
        image.save(path)
        images.append(image)
        print(f"sample: {path}")
    grid = out / "grid.png"
    label = f"{args.family}, {sampling['num_inference_steps']} steps, seed {args.seed}"
    sample_grid([images], [label], [p[:40] for p in args.prompt]).save(grid)
    print(f"grid:   {grid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
