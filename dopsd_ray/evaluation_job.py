"""The evaluation job from a Config (evaluation.py does the sampling and the scores): what
jobs/evaluate.py runs, what the driver runs after training with eval.at_end, and how
jobs/miniature.py scores its runs.

    result = run(cfg, model_path, {"dopsd": "outputs/dopsd/export"}, "outputs/dopsd/eval", sink=mlflow_run)

From the config:
- the base: model.path (model.tiny: the tiny model under the run dir, where the driver builds
  it), in model.dtype, on the GPU when this process has one;
- prompts (evaluation.py, "Prompts"): the eval.prompts file; else, for family toy, its
  concept's held-out and prior prompts (toy/scoring.py; the concept is data.path's
  concept.json); else the first captions of data.path (kind train, at most MAX_TRAIN_PROMPTS);
- training images, the references of CLIP-I, DINO and FD: the first MAX_REFERENCES rows of
  data.path (a local image folder, .jsonl or parquet shards), read only when one of those is on;
- settings: eval.seeds, samples_per_prompt, batch_size, reference_steps; eval.steps (default
  algorithm.inference_steps, the family's few-step setting); eval.size (default: the square side
  of data.pixel_budget, down to a multiple of the family's pixel_multiple);
- metrics: the built-in ones; CLIP-T and CLIP-I with eval.clip_path, DINO with eval.dino_path,
  FD with eval.fid_path (embeddings.py); for family toy, the toy evaluator
  (model.path/evaluator.safetensors) as one more metric.
Bad input is a ValueError of one line: the prompt file, a weights path or an export path
before any model loads, an export that does not fit the base before any sampling.

Writes out/results.json, out/table.md and out/samples_<kind>.png, and, given a MetricSink,
logs eval/<model>/<metric> (mean over seeds) and eval/<model>/<metric>_std at `step`, and
those files as artifacts under eval/.
"""

import io
import json
import math
from dataclasses import asdict
from pathlib import Path

from PIL import Image

from . import process
from .config import Config
from .storage import Storage, local_copy
from .data.shards import list_sources, load_row
from .embeddings import Embedder, FrechetDistance, PromptAlignment, ReferenceSimilarity, check_weights_path
from .evaluation import Evaluation, Prompt, Settings, evaluate, load_prompts, markdown_table, preview_grids
from .exports import export_problem

MAX_REFERENCES = 64  # training images read as references
MAX_TRAIN_PROMPTS = 16  # training captions sampled when no prompt file is given


def training_rows(cfg: Config, limit: int) -> list[tuple[str, Image.Image]]:
    """(first caption, RGB image) of the first `limit` usable rows of data.path, read locally:
    an image folder or .jsonl (as jobs/prepare_data.py reads them) or parquet shards."""
    from .data.stream import bundled_dataset_path  # (stream.py imports Ray: only when data is read)

    data = cfg.data.path or bundled_dataset_path()  # as the driver reads it
    paths = data if isinstance(data, list) else [data]
    rows = []
    for path in map(Path, paths):
        if "://" in str(path) or not path.exists():
            raise ValueError(f"data.path={str(path)!r} is not a local folder or file: the evaluation reads "
                             "training captions and images locally; give eval.prompts and no eval.*_path instead")
        shards = sorted(path.glob("*.parquet")) if path.is_dir() else [path] if path.suffix == ".parquet" else []
        if shards:
            import pyarrow.parquet as pq

            for shard in shards:
                table = pq.read_table(shard, columns=["image", "captions"]).to_pylist()
                rows += [(r["captions"][0], Image.open(io.BytesIO(r["image"])).convert("RGB")) for r in table]
        else:
            for source in list_sources(path):
                row, _ = load_row(source)  # unusable rows are skipped, as training skips them
                if row is not None:
                    rows.append((row["captions"][0], Image.open(io.BytesIO(row["image"])).convert("RGB")))
        if len(rows) >= limit:
            break
    if not rows:
        raise ValueError(f"data.path={data!r} holds no usable image + caption rows for the evaluation")
    return rows[:limit]


def toy_concept(cfg: Config):
    """The toy's concept (dopsd_ray/toy: imported only for family toy)."""
    from .toy.concept import Concept

    return Concept.load(cfg.data.path)


def prompts_for(cfg: Config) -> list[Prompt]:
    if cfg.eval.prompts:
        return load_prompts(cfg.eval.prompts)
    if cfg.model.family == "toy":
        from .toy.scoring import toy_prompts

        return toy_prompts(toy_concept(cfg))
    captions = dict.fromkeys(caption for caption, _ in training_rows(cfg, MAX_REFERENCES))
    return [Prompt("train", c) for c in list(captions)[:MAX_TRAIN_PROMPTS]]


def settings_for(cfg: Config, pixel_multiple: int) -> Settings:
    e = cfg.eval
    size = e.size or math.isqrt(cfg.data.pixel_budget) // pixel_multiple * pixel_multiple
    if size % pixel_multiple or size < pixel_multiple:
        raise ValueError(f"eval.size={size} is not a positive multiple of {pixel_multiple} (the model's pixel multiple)")
    return Settings(seeds=list(e.seeds), steps=e.steps or cfg.algorithm.inference_steps, size=size,
                    samples_per_prompt=e.samples_per_prompt, reference_steps=e.reference_steps,
                    batch_size=e.batch_size)


def check_inputs(cfg: Config) -> list[Prompt]:
    """The prompts, once every input the config names is checked: the prompt file (or the data
    the prompts come from) and the weights folders. ValueError, one line, for the first problem."""
    prompts = prompts_for(cfg)
    for key in ("clip_path", "dino_path", "fid_path"):
        path = getattr(cfg.eval, key)
        if path:
            check_weights_path(path, f"eval.{key}")
    return prompts


def weight_metrics(cfg: Config, device) -> list:
    """CLIP-T / CLIP-I, DINO and FD from the configured folders."""
    paths = {"clip": cfg.eval.clip_path, "dino": cfg.eval.dino_path, "fid": cfg.eval.fid_path}
    references = [image for _, image in training_rows(cfg, MAX_REFERENCES)] if any(paths.values()) else []
    metrics = []
    if paths["clip"]:
        clip = Embedder.from_pretrained(paths["clip"], "eval.clip_path", device)
        metrics += [PromptAlignment(clip), ReferenceSimilarity(clip, references, "clip_i")]
    if paths["dino"]:
        metrics.append(ReferenceSimilarity(Embedder.from_pretrained(paths["dino"], "eval.dino_path", device),
                                           references, "dino"))
    if paths["fid"]:
        metrics.append(FrechetDistance(Embedder.from_pretrained(paths["fid"], "eval.fid_path", device), references))
    return metrics


def toy_metric(cfg: Config, model_path: str, prompts: list[Prompt]):
    """The miniature's scores (toy/scoring.py) with the evaluator beside the toy base."""
    from .toy.evaluator import Evaluator
    from .toy.scoring import ToyMetric

    file = Path(model_path) / "evaluator.safetensors"
    if not file.is_file():
        raise ValueError(f"{file} does not exist: the toy evaluation needs the evaluator of the toy base "
                         "(models/toy, or python jobs/build_toy_base.py)")
    metric = ToyMetric(Evaluator.load(file), toy_concept(cfg))
    metric.check_prompts(prompts)
    return metric


def run(cfg: Config, model_path: str, exports: dict[str, str | Path], out: str | Path, sink=None, step: int = 0,
        log=print) -> Evaluation:
    """Evaluate the base and `exports` (name -> path or URI), write the results under `out` (a
    path or a URI), log them to `sink`."""
    prompts = check_inputs(cfg)
    models = {"base": str(model_path), **{k: str(v) for k, v in exports.items()}}  # as given (URIs too)
    # an export on an object store: its files (not its step_N folders) copied here
    exports = {name: local_copy(path, recursive=False) for name, path in exports.items()}
    for path in exports.values():
        problem = export_problem(path)
        if problem:
            raise ValueError(problem)
    device = process.device()
    model_path = local_copy(model_path)
    metrics = weight_metrics(cfg, device)
    if cfg.model.family == "toy":
        metrics.append(toy_metric(cfg, model_path, prompts))
    family = process.load(cfg, model_path, device)
    result = evaluate(family, exports, prompts, settings_for(cfg, family.pixel_multiple), metrics, log)
    result.models = models
    write(result, out)
    if sink is not None:
        log_results(sink, result, step)
    return result


def report_files(result: Evaluation) -> dict:
    """name -> text or PIL image: results.json, table.md, samples_<kind>.png."""
    summary = result.summary()
    report = {"settings": asdict(result.settings), "models": result.models, "scores": summary}
    return {"results.json": json.dumps(report, indent=2) + "\n", "table.md": markdown_table(summary) + "\n",
            **{f"samples_{kind}.png": grid for kind, grid in preview_grids(result).items()}}


def write(result: Evaluation, out: str | Path) -> None:
    """results.json, table.md and samples_<kind>.png under `out` (a path or a URI)."""
    store = Storage(out)
    for name, content in report_files(result).items():
        if isinstance(content, str):
            store.write(name, content)
        else:
            store.write_with(name, lambda p, image=content: image.save(p, format="PNG"))


def log_results(sink, result: Evaluation, step: int = 0) -> None:
    """eval/<model>/<metric> (mean over seeds) and ..._std to a MetricSink at `step`; write()'s
    files as artifacts under eval/."""
    metrics = {}
    for model, scores in result.summary().items():
        for name, s in scores.items():
            metrics[f"eval/{model}/{name}"] = s["mean"]
            metrics[f"eval/{model}/{name}_std"] = s["std"]
    sink.log_metrics(metrics, step=step)
    for name, content in report_files(result).items():
        if isinstance(content, str):
            sink.log_text(content, f"eval/{name}")
        else:
            sink.log_image(content, f"eval/{name}")


def evaluate_run(config: dict, model_path: str, exports: dict[str, str], out: str, sink=None, step: int = 0) -> dict:
    """run() from a config dict, returning the summary: what the driver's eval.at_end task runs."""
    cfg = process.begin(config)
    return run(cfg, model_path, exports, out, sink, step).summary()
