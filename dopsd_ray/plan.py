"""Will the recipe fit? GPU memory per learner rank and per rollout worker, from config files alone.

    counts = count(cfg)                  # the models built from their config.json on the meta device
    p = plan(cfg, counts, gpu_memory_gb=80)
    print(p.report()); p.fits; p.advice  # what to change when it does not fit

`count` builds the transformer, the text encoder, the VAE and the teacher VLM with the family's
own classes (families/<family>.py COMPONENT_CLASSES) on the meta device: no weights are read.
The LoRA adapters come from weights.make_weights itself, so what is trainable, what is the
teacher and what stays a frozen buffer is what the learner builds. Hub ids resolve to the
configs shipped under models/configs/<org>--<name>/; a local pipeline directory is read as is.

Exact parts (tests/test_plan.py checks them against DeepSpeed's partitions): parameter, trainable,
teacher and frozen counts; the ZeRO partition of each (stage 3: every parameter DeepSpeed owns is
split per parameter, ceil(numel / world); stages 1-2: the optimizer state (and at 2 the gradients)
of the flat trainable group, ceil(total / world)); AdamW's two fp32 moments, plus the fp32 master
copy DeepSpeed keeps of bf16 parameters; the EMA teacher's fp32 shadow of this rank's teacher
shards (weights.EmaTeacher; none for an fp32 teacher). With LoRA the frozen base stays whole on
every rank (weights.LoraWeights.base_as_buffers).

The activation figure is an ESTIMATE (see `activation_bytes`). GPU_MARGIN leaves room for the
allocator, the CUDA context and transients (teacher forward, VAE decode, NCCL buffers).
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import Config, ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "models" / "configs"
GPU_MARGIN = 0.9  # a recipe fits when its per-rank total is at most this share of the GPU's memory
GIB = 2**30
# Activation bytes per token per transformer block and hidden unit, for 2-byte activations:
# Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models"),
# 34 s b h for one block with a fused (flash) attention kernel, so no s^2 term.
ACT_PER_TOKEN_HIDDEN = 34


@dataclass
class Counts:
    """Element counts of the recipe's models (what `count` measures on the meta device)."""

    transformer: int  # every transformer parameter (LoRA: the frozen base, without adapters)
    trainable: list[int]  # numel of each trainable (student) parameter
    teacher: list[int]  # numel of each teacher parameter (LoRA: the second adapter; full: a copy)
    frozen: int  # LoRA: the base, kept whole on every rank as buffers; full fine-tuning: 0
    text_encoder: int
    vae: int
    vlm: int  # the teacher VLM's own parameters (its language model is the text encoder's); 0 without one
    hidden: int  # transformer hidden size, blocks, image pixels per token side (families' plan_shape)
    blocks: int
    token_pixels: int
    largest_block: int  # numel of the largest transformer block (what ZeRO-3 gathers at once)


def config_dir(path: str) -> Path:
    """A local pipeline directory, or the shipped configs of a hub id."""
    if Path(path).is_dir():
        return Path(path)
    shipped = CONFIG_DIR / path.replace("/", "--")
    if shipped.is_dir():
        return shipped
    known = ", ".join(sorted(p.name.replace("--", "/") for p in CONFIG_DIR.iterdir() if p.is_dir()))
    raise ConfigError(f"no config files for {path!r}: plan.py knows {known}; point model.path "
                      f"(or model.teacher_vlm_path) at a local pipeline directory, or add its config.json "
                      f"files under models/configs/{path.replace('/', '--')}/")


def _read(directory: Path, name: str = "config.json") -> dict:
    return json.loads((directory / name).read_text())


def build_meta(cls, config: dict) -> torch.nn.Module:
    """A diffusers or transformers model from its config.json, on the meta device (no memory)."""
    with torch.device("meta"):
        if hasattr(cls, "config_class"):  # transformers
            return cls(cls.config_class(**{k: v for k, v in config.items() if not k.startswith("_")}))
        return cls.from_config(config)


def numel(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def count_transformer(cfg: Config, transformer: torch.nn.Module) -> dict:
    """Trainable, teacher and frozen numels of the weights the learner builds around `transformer`
    (weights.make_weights, the learner's own call; works on meta and on real modules alike)."""
    from .families import lora_targets
    from .weights import make_weights

    total = numel(transformer)
    with torch.device(next(transformer.parameters()).device):  # the adapters where the model is (meta)
        weights = make_weights(transformer, cfg.lora, lora_targets(cfg.model.family))
    frozen = weights.base_as_buffers()
    blocks = [numel(m) for m in transformer.modules() if type(m).__name__ in (transformer._no_split_modules or [])]
    return dict(transformer=total, trainable=[p.numel() for p in weights.trainable_parameters()],
                teacher=[p.numel() for p in weights.teacher_parameters()], frozen=frozen,
                largest_block=max(blocks, default=0))


def count(cfg: Config, model_path: str | None = None) -> Counts:
    """The recipe's models built on the meta device from their config files."""
    from .families import family_module

    if cfg.model.tiny or not hasattr(family_module(cfg.model.family), "COMPONENT_CLASSES"):
        raise ConfigError(f"plan.py plans the real model families (zimage, flux2_klein); model.family="
                          f"{cfg.model.family!r} model.tiny={cfg.model.tiny} is small enough for any machine")
    family = family_module(cfg.model.family)
    root = config_dir(model_path or cfg.model.path)
    built = {name: build_meta(cls, _read(root / name)) for name, cls in family.COMPONENT_CLASSES.items()}
    vlm = 0
    if cfg.model.teacher_context == "vlm":
        from transformers import Qwen3VLForConditionalGeneration

        vlm_path = cfg.model.teacher_vlm_path or family.default_teacher_vlm(root)
        if vlm_path is None:
            raise ConfigError("model.teacher_context=vlm: set model.teacher_vlm_path (no default VLM for this model)")
        model = build_meta(Qwen3VLForConditionalGeneration, _read(config_dir(vlm_path)))
        # the language model is the text encoder's (vlm.share_language_model); a tied lm_head goes with it
        shared = {id(p) for p in model.model.language_model.parameters()}
        if model.config.tie_word_embeddings:
            shared.add(id(model.lm_head.weight))
        vlm = sum(p.numel() for p in model.parameters() if id(p) not in shared)
    hidden, blocks, token_pixels = family.plan_shape(_read(root / "transformer"))
    return Counts(**count_transformer(cfg, built["transformer"]), text_encoder=numel(built["text_encoder"]),
                  vae=numel(built["vae"]), vlm=vlm, hidden=hidden, blocks=blocks, token_pixels=token_pixels)


def partition(numels: list[int], world: int, per_parameter: bool) -> int:
    """One rank's share: ZeRO-3 splits every parameter (ceil each), stages 1-2 the flat group."""
    return sum(math.ceil(n / world) for n in numels) if per_parameter else math.ceil(sum(numels) / world)


def activation_bytes(cfg: Config, c: Counts, checkpointing: bool) -> int:
    """ESTIMATE of the student's training activations on one learner rank.

    tokens N = pixel_budget / token_pixels^2 image tokens + max_sequence_length text tokens;
    forwards F = batch_size: the learner backpropagates each trained state as soon as it is
    scored (algorithms/dopsd.py), so one state's graph is alive at a time, whatever K, as for
    SFT; per block and token: ACT_PER_TOKEN_HIDDEN x hidden x (dtype bytes / 2).
      without checkpointing: F x N x blocks x 34 h
      with checkpointing:    F x N x blocks x h x dtype bytes (each block's input)  +  N x batch x 34 h
                             (one block recomputed at a time in the backward)
    The teacher's forward runs without grad and the roll-out's too: their activations are transient.
    """
    b = 2 if cfg.model.dtype == "bfloat16" else 4
    tokens = cfg.data.pixel_budget // c.token_pixels**2 + cfg.model.max_sequence_length
    forwards = cfg.train.batch_size
    per_block = ACT_PER_TOKEN_HIDDEN * c.hidden * b // 2
    if not checkpointing:
        return forwards * tokens * c.blocks * per_block
    return forwards * tokens * c.blocks * c.hidden * b + cfg.train.batch_size * tokens * per_block


@dataclass
class Plan:
    gpu_memory_gb: float | None
    rows: dict[str, list[tuple[str, int, str]]]  # role -> (item, bytes, how)
    sync_bytes: int
    advice: list[str] = field(default_factory=list)

    def total(self, role: str) -> int:
        return sum(b for _, b, _ in self.rows[role])

    @property
    def fits(self) -> bool:
        return self.gpu_memory_gb is None or all(
            self.total(role) <= self.gpu_memory_gb * GIB * GPU_MARGIN for role in self.rows)

    def refusal(self) -> str:
        """One line: how much the largest role needs and what to change."""
        role = max(self.rows, key=self.total)
        return (f"the recipe needs {self.total(role) / GIB:.1f} GiB per {role} but the GPU has {self.gpu_memory_gb:g} GiB "
                f"(x {GPU_MARGIN} margin); change " + ("; or ".join(self.advice) or "the model or the GPU")
                + " (python jobs/plan.py --config RECIPE shows every row)")

    def report(self) -> str:
        lines = []
        for role, rows in self.rows.items():
            lines.append(f"{role}:")
            lines += [f"  {item:<34} {b / GIB:9.2f} GiB  {how}" for item, b, how in rows]
            lines.append(f"  {'total':<34} {self.total(role) / GIB:9.2f} GiB")
        lines.append(f"sync payload per snapshot:          {self.sync_bytes / GIB:9.2f} GiB")
        if self.gpu_memory_gb is not None:
            limit = self.gpu_memory_gb * GPU_MARGIN
            lines.append(f"fits in {self.gpu_memory_gb:g} GiB x {GPU_MARGIN} = {limit:.1f} GiB per GPU: "
                         + ("yes" if self.fits else "NO"))
            lines += [f"  to fit: {a}" for a in self.advice]
        return "\n".join(lines)


def plan(cfg: Config, c: Counts, gpu_memory_gb: float | None = None, advise: bool = True,
         model_path: str | None = None) -> Plan:
    """Bytes per learner rank (and per rollout worker in disaggregated mode) for `cfg` with models `c`."""
    rt, lora = cfg.runtime, cfg.lora.enabled
    b = 2 if cfg.model.dtype == "bfloat16" else 4
    world, stage = rt.num_learners, rt.zero_stage
    z3 = stage == 3
    train_local = partition(c.trainable, world, z3) if z3 else sum(c.trainable)
    teacher_local = partition(c.teacher, world, z3) if z3 else sum(c.teacher)
    opt_local = partition(c.trainable, world, z3) if stage >= 1 else sum(c.trainable)
    grad_local = partition(c.trainable, world, z3) if stage >= 2 else sum(c.trainable)
    shard = f"/{world} ranks" if world > 1 else ""
    learner = []
    if lora:
        learner.append(("frozen base (buffers, whole)", c.frozen * b, f"{c.frozen:,} x {b} B on every rank"))
    learner += [
        ("student " + ("LoRA adapter" if lora else "transformer"), train_local * b,
         f"{sum(c.trainable):,} x {b} B" + (f", ZeRO-3 {shard}" if z3 and world > 1 else "")),
        ("teacher " + ("LoRA adapter" if lora else "copy (EMA)"), teacher_local * b,
         f"{sum(c.teacher):,} x {b} B" + (f", ZeRO-3 {shard}" if z3 and world > 1 else "")),
        ("gradients", grad_local * b, f"{b} B per trainable" + (f", ZeRO-{stage} {shard}" if stage >= 2 and world > 1 else "")),
    ]
    # AdamW: exp_avg and exp_avg_sq in fp32; under bf16 DeepSpeed also keeps an fp32 master copy
    per = 12 if b == 2 else 8
    if rt.offload_optimizer:
        learner.append(("optimizer state (offloaded)", 0, f"{opt_local * per / GIB:.2f} GiB in CPU memory instead"))
    else:
        learner.append(("optimizer state", opt_local * per, f"{per} B per trainable (AdamW 2 x fp32"
                        + (" + fp32 master" if b == 2 else "") + ")"
                        + (f", ZeRO-{stage} {shard}" if stage >= 1 and world > 1 else "")))
    learner.append(("EMA fp32 shadow", teacher_local * 4 if b != 4 else 0,
                    "fp32 copy of this rank's teacher" if b != 4 else "the fp32 teacher is its own shadow"))
    if z3 and not lora:  # every block's parameters are gathered whole for its forward / backward
        learner.append(("ZeRO-3 gathered block (est.)", 2 * c.largest_block * b, "largest block x 2 (prefetch)"))
    cached = cfg.data.cache_contexts
    encoders = [("VAE", c.vae * b, f"{c.vae:,} x {b} B")]
    if not cached:
        encoders.insert(0, ("text encoder", c.text_encoder * b, f"{c.text_encoder:,} x {b} B"))
        if c.vlm:
            encoders.append(("teacher VLM (vision + own)", c.vlm * b, f"{c.vlm:,} x {b} B; LM is the text encoder"))
    else:
        released = "text encoder + VLM" if c.vlm else "text encoder"
        encoders.append((released, 0, "released: data.cache_contexts=true"))
    act = activation_bytes(cfg, c, cfg.model.gradient_checkpointing)
    other = activation_bytes(cfg, c, not cfg.model.gradient_checkpointing)
    on = "with" if cfg.model.gradient_checkpointing else "without"
    off = "without" if cfg.model.gradient_checkpointing else "with"
    rows = {"learner rank": learner + encoders + [
        (f"activations ESTIMATE ({on} ckpt)", act, f"{off} gradient checkpointing: {other / GIB:.2f} GiB"
         " (formula: plan.activation_bytes)")]}
    teacher_on_rollout = rt.teacher_targets == "rollout"
    if rt.rollout_workers:
        worker = [("transformer (student)", (c.frozen + sum(c.trainable) if lora else sum(c.trainable)) * b, "no optimizer")]
        if teacher_on_rollout:
            worker.append(("teacher " + ("LoRA adapter" if lora else "copy"), sum(c.teacher) * b, "teacher_targets=rollout"))
        worker.append(("VAE", c.vae * b, ""))
        if not cached:
            worker.append(("text encoder", c.text_encoder * b, ""))
            if c.vlm and teacher_on_rollout:
                worker.append(("teacher VLM (vision + own)", c.vlm * b, ""))
        tokens = cfg.data.pixel_budget // c.token_pixels**2 + cfg.model.max_sequence_length
        worker.append(("activations ESTIMATE (no grad)", cfg.train.batch_size * tokens * ACT_PER_TOKEN_HIDDEN * c.hidden * b // 2,
                       "one block at a time"))
        rows["rollout worker"] = worker
    sync = sum(c.trainable) * b + (sum(c.teacher) * b if teacher_on_rollout else 0)
    result = Plan(gpu_memory_gb, rows, sync)
    if advise and not result.fits:
        result.advice = advice(cfg, c, gpu_memory_gb, model_path)
    return result


# What preflight suggests, in this order, when a recipe does not fit: each is tried alone on the
# recipe, and named with the per-rank total it would give.
CHANGES = [
    ("lora", "enabled", True), ("runtime", "zero_stage", 3), ("runtime", "offload_optimizer", True),
    ("model", "gradient_checkpointing", True), ("data", "cache_contexts", True),
]


def advice(cfg: Config, c: Counts, gpu_memory_gb: float, model_path: str | None = None) -> list[str]:
    """Each change of CHANGES (and twice the learners, half the pixel budget) that lowers the largest
    role's total, with that total; then all of them together."""
    def total(changed: Config) -> tuple[float, bool]:
        counts = count(changed, model_path) if changed.lora != cfg.lora else c  # LoRA changes the counts
        p = plan(changed, counts, gpu_memory_gb, advise=False)
        return max(p.total(role) for role in p.rows) / GIB, p.fits

    trials = [(s, k, v) for s, k, v in CHANGES if getattr(getattr(cfg, s), k) != v]
    trials += [("runtime", "num_learners", cfg.runtime.num_learners * 2), ("data", "pixel_budget", cfg.data.pixel_budget // 2)]
    before, _ = total(cfg)
    out, combined, names = [], cfg.model_copy(deep=True), []
    for section, key, value in trials:
        changed = cfg.model_copy(deep=True)
        for target in (changed, combined):
            setattr(getattr(target, section), key, value)
        after, fits = total(changed)
        if after < before:
            names.append(f"{section}.{key}={str(value).lower() if isinstance(value, bool) else value}")
            out.append(f"{names[-1]} ({before:.1f} -> {after:.1f} GiB{', fits' if fits else ''})")
    if len(names) > 1:
        after, fits = total(combined)
        out.append(f"all of these together: {after:.1f} GiB" + ("" if fits else ", still too much: use a larger GPU"))
    return out


def check_fits(cfg: Config, gpu_memory_gb: float, model_path: str | None = None) -> Plan:
    """Raise ConfigError naming what to change when the recipe cannot fit `gpu_memory_gb` per GPU."""
    p = plan(cfg, count(cfg, model_path), gpu_memory_gb, model_path=model_path)
    if not p.fits:
        raise ConfigError(p.refusal())
    return p


def check_this_gpu(cfg: Config, device: torch.device, model_path: str | None = None) -> None:
    """A learner rank's check when runtime.gpu_memory_gb is unset: against its own GPU's memory, before
    loading weights. Skipped on CPU, for tiny / toy models, and (with a note) for a model whose config
    files plan.py cannot find."""
    if device.type != "cuda" or cfg.runtime.gpu_memory_gb is not None or cfg.model.tiny or cfg.model.family == "toy":
        return
    try:
        counts = count(cfg, model_path)
    except ConfigError as err:
        print(f"memory check skipped: {err}", flush=True)
        return
    gib = torch.cuda.get_device_properties(device).total_memory / GIB
    p = plan(cfg, counts, gib, model_path=model_path)
    if not p.fits:
        raise ConfigError(p.refusal())
