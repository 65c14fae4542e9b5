"""The one typed configuration schema, with every default in one place: the ground floor,
importing nothing of the package.

recipes.py loads a YAML recipe with `section.key=value` overrides through it and fills in
what a model family decides (families.complete: the teacher context, the few-step setting,
the toy's default paths). Unknown keys, wrong types and values outside their allowed range
fail at load time, with a message naming the field and what is allowed.
"""

import string
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    family: str = "zimage"  # a name in dopsd_ray/families/__init__.py: zimage, flux2_klein or toy
    # Hub id or local directory of a diffusers pipeline (the toy: models/toy by default). With
    # tiny=True a random tiny pipeline is built under the run's output dir and loaded from there.
    path: str | None = None
    tiny: bool = False
    variant: Literal["4b", "9b"] | None = None  # flux2_klein only
    teacher_context: str | None = None  # one of the family's TEACHER_CONTEXTS; None: its default (the first)
    teacher_vlm_path: str | None = None  # Qwen3-VL checkpoint for the VLM teacher context
    dtype: Literal["float32", "bfloat16"] = "float32"
    max_sequence_length: int = Field(512, ge=8)
    teacher_max_sequence_length: int = Field(1024, ge=8)
    vlm_min_pixels: int = Field(512 * 512, ge=16)
    vlm_max_pixels: int = Field(768 * 768, ge=16)
    gradient_checkpointing: bool = False

    @model_validator(mode="after")
    def _check(self):
        if self.path is not None and self.tiny:
            raise ValueError("set either model.path or model.tiny=true, not both")
        if self.variant is not None and self.family != "flux2_klein":
            raise ValueError("model.variant applies to flux2_klein only (4b or 9b)")
        if self.vlm_min_pixels > self.vlm_max_pixels:
            raise ValueError("model.vlm_min_pixels must not exceed model.vlm_max_pixels")
        return self


class LoraSettings(Section):
    # (not peft's LoraConfig: this is the recipe's `lora:` section, which weights.make_weights turns into one)
    enabled: bool = True  # false: full fine-tuning with a full-parameter EMA teacher
    rank: int = Field(64, ge=1)
    alpha: float = Field(128.0, gt=0)
    init: Literal["gaussian", "default"] = "gaussian"
    targets: list[str] | None = None  # None: the family's released-recipe preset


class AlgorithmConfig(Section):
    name: Literal["dopsd", "sft"] = "dopsd"
    # x0: ||x0_S - x0_T||^2 = sigma^2 ||v_S - v_T||^2 (released recipe); velocity: paper.
    loss_space: Literal["x0", "velocity"] = "x0"
    # recipe_4step: Z-Image recipe [1, .9, .75, .5, 0]; inference: the family's few-step
    # inference schedule (FLUX.2-klein's native 4-step one); or an explicit list.
    training_sigmas: Literal["recipe_4step", "inference"] | list[float] = "recipe_4step"
    inference_steps: int | None = Field(None, ge=1)  # None: the family's INFERENCE_STEPS
    # None trains on all K visited states (the recipe); m < K trains on a random subset.
    states_per_rollout: int | None = Field(None, ge=1)
    ema_decay: float = Field(0.9999, ge=0.0, le=1.0)
    sft_logit_mean: float = 0.0
    sft_logit_std: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _check(self):
        if isinstance(self.training_sigmas, list):
            s = self.training_sigmas
            if len(s) < 2 or s[0] > 1.0 or s[-1] != 0.0 or any(a <= b for a, b in zip(s, s[1:])):
                raise ValueError(
                    "algorithm.training_sigmas must decrease strictly from <= 1.0 to 0.0, "
                    f"e.g. [1.0, 0.9, 0.75, 0.5, 0.0]; got {s}"
                )
        return self


class OptimConfig(Section):
    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    # The learning rate of optimizer step s (algorithms/lr_schedule.py): a linear warm-up over
    # the first warmup_steps steps, then constant, or a linear or cosine decay over the rest
    # of train.steps. The released recipes: constant, no warm-up.
    scheduler: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    max_consecutive_skips: int = Field(10, ge=1)  # non-finite steps in a row before stopping


def check_caption_template(template: str) -> str:
    """data.caption_template holds the field {caption} once and no other format field."""
    example = "e.g. 'photo of sks, {caption}' (write a literal brace as {{ or }})"
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as err:  # an unpaired brace
        raise ValueError(f"not a valid template ({err}); {example}") from None
    for name, spec, conv in fields:
        if name != "caption" or spec or conv:
            shown = "{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
            raise ValueError(f"has the field {shown}; the only field allowed is {{caption}}, {example}")
    if len(fields) != 1:
        raise ValueError(f"must contain the field {{caption}} exactly once, found it {len(fields)} times; {example}")
    return template


class DataConfig(Section):
    # Parquet shards (a directory, files, or s3:// URIs) or webdataset tars written by
    # jobs/prepare_data.py; or, read into memory (small sets), a folder of images + .txt
    # captions, a .jsonl, or a .csv / .parquet table with named columns (data/shards.py).
    # None: the bundled dataset (data/bundled) (for family=toy: the toy concept images,
    # data/toy_concept).
    path: str | list[str] | None = None
    pixel_budget: int = Field(1024 * 1024, ge=16 * 16)  # aspect-ratio buckets near this area
    max_aspect_ratio: float = Field(2.0, ge=1.0)
    caption: Literal["random", "first"] = "random"
    # Every dataset caption goes through this, e.g. "photo of sks, {caption}" for a trigger
    # word: once, where a row is decoded, so training and the sample grids' pairs alike.
    caption_template: str | None = None
    # A .csv / .parquet table's (or a .jsonl's) image and caption columns
    image_column: str = Field("image", min_length=1)
    caption_column: str = Field("caption", min_length=1)
    # Each image this many times per epoch: for a handful of images (DreamBooth style),
    # fewer, longer epochs instead of one data pipeline restart per step. The decoded
    # dataset is then held in the object store: meant for small datasets.
    repeats: int = Field(1, ge=1)
    # Compute every pair's student and teacher context once, before training, into
    # <run dir>/context_cache (dopsd_ray/contexts.py); learners and rollout workers then read
    # them and free their text encoder and VLM. For small datasets: the fill visits every row.
    cache_contexts: bool = False

    @field_validator("caption_template")
    @classmethod
    def _template(cls, template: str | None) -> str | None:
        return None if template is None else check_caption_template(template)


class TrainConfig(Section):
    steps: int = Field(2000, ge=1)
    batch_size: int = Field(1, ge=1)  # per learner rank and micro-batch
    # micro-batches per optimizer step (gradient accumulation): a step trains on
    # batch_size * grad_accum * num_learners images; train.steps counts optimizer steps
    grad_accum: int = Field(1, ge=1)
    seed: int = 0
    output_dir: str = "outputs"
    run_name: str = "dopsd"
    checkpoint_every: int = Field(100, ge=1)
    # Sample grids (dopsd_ray/preview.py) at step 0 and every sample_every steps: one column per
    # validation prompt, then one per validation training pair (its caption; teacher and image rows).
    sample_every: int = Field(250, ge=1)
    validation_prompts: list[str] = Field(default_factory=list)
    # Side in pixels of the square samples, a multiple of the family's pixel_multiple;
    # None: the validation training pairs' bucket (height x width).
    sample_size: int | None = Field(None, ge=1)
    # A loadable export (LoRA file, or transformer folder) every export_every steps, in
    # <run dir>/export/step_NNNNNN; the last one also in <run dir>/export. None: the last only.
    export_every: int | None = Field(None, ge=1)
    log_every: int = Field(1, ge=1)


class RuntimeConfig(Section):
    mode: Literal["colocated", "disaggregated"] = "colocated"
    max_staleness: int = Field(0, ge=0)  # disaggregated: 0 = strictly on-policy
    teacher_targets: Literal["learner", "rollout"] = "learner"
    num_learners: int = Field(1, ge=1)
    learner_resources: dict[str, float] = Field(default_factory=lambda: {"CPU": 1})
    num_rollout_workers: int = Field(1, ge=0)
    rollout_resources: dict[str, float] = Field(default_factory=lambda: {"CPU": 1})
    sync_every: int = Field(1, ge=1)
    sync_transport: Literal["object_store", "collective"] = "object_store"
    sync_timeout_s: float = Field(300.0, gt=0)
    # The first snapshot comes after model loading and DeepSpeed set-up (minutes at 6-9B):
    # rollout workers wait this long for it, and sync_timeout_s for every later one.
    startup_timeout_s: float = Field(1800.0, gt=0)
    # A rollout worker that lost its process or its node must be back (placed again, on a node
    # that remains or one an autoscaler adds, and its model loaded) within this, or the run
    # fails naming the resources no node has (dopsd_ray/nodes.py). At most sync_timeout_s (the
    # learner waits that long for an experience); None: sync_timeout_s.
    replacement_timeout_s: float | None = Field(None, gt=0)
    sync_bucket_numel: int = Field(50_000_000, ge=1)
    buffer_size: int = Field(4, ge=1)
    zero_stage: Literal[0, 1, 2, 3] = 3
    offload_optimizer: bool = False
    # GiB per GPU for the memory check (dopsd_ray/plan.py): preflight refuses a recipe that cannot fit
    # it, naming what to change. None: each GPU learner rank checks against its own GPU's memory
    # before loading weights (skipped on CPU).
    gpu_memory_gb: float | None = Field(None, gt=0)
    max_failures: int = Field(2, ge=0)
    torch_threads: int | None = Field(None, ge=1)
    # A GPU learner with CPU-only rollout workers is refused (a 6B roll-out on CPU is about
    # 100x slower) unless this says it is meant.
    allow_cpu_rollout: bool = False
    # Debug: rollout workers fingerprint their student weights in every experience and the
    # learner checks them against the snapshot it published for that version.
    debug_check_sync: bool = False

    @property
    def rollout_workers(self) -> int:
        """Rollout workers the run starts: runtime.num_rollout_workers when disaggregated, none
        when colocated (the learners roll out themselves). Everything but the driver's choice
        of the learners' source reads the mode through this."""
        return self.num_rollout_workers if self.mode == "disaggregated" else 0

    @property
    def process_resources(self) -> list[dict[str, float]]:
        """What one learner rank, and (when there are any) one rollout worker, is placed on."""
        return [self.learner_resources] + ([self.rollout_resources] if self.rollout_workers else [])

    @model_validator(mode="after")
    def _check(self):
        if self.mode == "disaggregated" and self.num_rollout_workers < 1:
            raise ValueError("runtime.mode=disaggregated needs runtime.num_rollout_workers >= 1")
        if self.teacher_targets == "rollout" and self.mode != "disaggregated":
            raise ValueError("runtime.teacher_targets=rollout needs runtime.mode=disaggregated")
        if self.max_staleness < self.sync_every - 1:
            raise ValueError(
                f"runtime.max_staleness={self.max_staleness} < runtime.sync_every - 1 = {self.sync_every - 1}: "
                "experiences between syncs would always be too stale; raise max_staleness or sync less rarely")
        if self.replacement_timeout_s is None:
            self.replacement_timeout_s = self.sync_timeout_s
        if self.replacement_timeout_s > self.sync_timeout_s:
            raise ValueError(
                f"runtime.replacement_timeout_s={self.replacement_timeout_s:g} > runtime.sync_timeout_s="
                f"{self.sync_timeout_s:g}: the learner would give up waiting for experiences before a lost rollout "
                "worker's replacement is due; raise sync_timeout_s or lower replacement_timeout_s")
        return self


class TrackingConfig(Section):
    # None: a SQLite store under the run's output dir; MLFLOW_TRACKING_URI overrides it.
    tracking_uri: str | None = None
    experiment: str = "dopsd-ray"


class EvalConfig(Section):
    """The evaluation job (jobs/evaluate.py, dopsd_ray/evaluation_job.py): what it samples and scores."""

    # A prompt file (JSONL or text, rows of kind train / heldout / prior; see evaluation.py).
    # None: the training captions of data.path (the toy: its concept's held-out and prior prompts).
    prompts: str | None = None
    seeds: list[int] = Field(default_factory=lambda: [1000, 2000, 3000], min_length=1)  # one noise draw each
    samples_per_prompt: int = Field(2, ge=1)  # a prompt file row may set its own
    steps: int | None = Field(None, ge=1)  # None: algorithm.inference_steps, the family's few-step setting
    reference_steps: int | None = Field(None, ge=2)  # many-step reference for few-step retention; None: skip
    size: int | None = Field(None, ge=16)  # square image side; None: the side of data.pixel_budget
    batch_size: int = Field(4, ge=1)  # samples per forward
    # Local from_pretrained folders (nothing is downloaded): CLIP (CLIP-T, CLIP-I), DINOv2/v3
    # (DINO), and an image backbone for the Frechet distance to the training images.
    clip_path: str | None = None
    dino_path: str | None = None
    fid_path: str | None = None
    at_end: bool = False  # evaluate the export at the end of training, into the training run


class Config(Section):
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(tiny=True))
    lora: LoraSettings = Field(default_factory=LoraSettings)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _check(self):
        if self.algorithm.name == "sft" and self.runtime.teacher_targets == "rollout":
            raise ValueError("runtime.teacher_targets=rollout has no meaning for algorithm.name=sft")
        return self

    @property
    def run_dir(self) -> str:
        """train.output_dir / train.run_name: a path, or an object-store URI (storage.Storage)."""
        out = self.train.output_dir
        return f"{out.rstrip('/')}/{self.train.run_name}" if "://" in out else str(Path(out) / self.train.run_name)


class ConfigError(ValueError):
    """A configuration problem, with the offending field named."""


def format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see dopsd_ray/config.py for the schema)"
        lines.append(f"  {where}: {msg}" + (f" (got {e['input']!r})" if e["type"] != "extra_forbidden" and not isinstance(e["input"], dict) else ""))
    return "invalid configuration:\n" + "\n".join(lines)


def flatten(cfg: Config) -> dict[str, Any]:
    """section.key -> value, for MLflow params."""
    out = {}
    for section, values in cfg.model_dump().items():
        for k, v in values.items():
            out[f"{section}.{k}"] = v
    return out
