"""FLUX.2-klein (4B and 9B) as a D-OPSD model family (diffusers Flux2KleinPipeline components).

FLUX.2's conventions, all hidden in this file (base.py speaks sigma / v = eps - x0):
- latents outside the family are the pipeline's own pre-packing layout: the VAE's
  32-channel latents patchified 2x2 to (B, 128, H/16, W/16) and normalised with the
  VAE's BatchNorm running statistics, (z - mean) / sqrt(var + eps);
- the transformer takes tokens (B, N, 128) plus 4-axis position ids (t, y, x, l) for
  image tokens and text tokens, and uses the FIRST item's ids for the whole batch, so
  every item of a batch must share one resolution (check_images enforces it);
- its timestep is sigma (the pipeline passes scheduler timestep / 1000, the model
  multiplies by 1000 again); klein is guidance-distilled, so guidance is None; its
  output is the diffusers velocity eps - x0 as is;
- sigmas: linspace(1, 1/N, N) through the scheduler with dynamic shifting, with
  mu = compute_empirical_mu(image tokens, N); this is also klein's native 4-step
  training schedule.

Student context: the pipeline's prompt encoding (Qwen3 chat template with
enable_thinking=False, padded to max_sequence_length, hidden states at layers
(9, 18, 27) stacked to (B, L, 3 * D)) with text ids (0, 0, 0, l).

Teacher contexts (docs/method.md, "Teacher contexts"):
- "reference" (the released klein recipe): the target image VAE-encoded exactly like
  the pipeline encodes a reference image (posterior mode, patchify, BatchNorm
  normalisation), packed as reference tokens with ids t = 10 and appended AFTER the
  noisy tokens inside `velocity` (the output is sliced back to the first N tokens);
  the caption gets DEFAULT_INSTRUCTION appended after one space.
- "vlm": Qwen3-VL features of (target image, caption) with the VLM's language model
  overwritten by klein's Qwen3 text encoder (vlm.py), hidden states at the same out
  layers stacked; padded with the pad token to teacher_max_sequence_length and the pad
  positions kept, like the student path (the transformer has no text mask).

Gradient checkpointing: `transformer.enable_gradient_checkpointing()` (diffusers
checkpoints every block); Flux2TransformerBlock and Flux2SingleTransformerBlock are the
FSDP / ZeRO-3 wrapping units (the model's _no_split_modules).
"""

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu
from torch import nn
from torch.nn import functional as F
from transformers import Qwen3ForCausalLM

from ..algorithms.schedules import static_shift
from .base import check_image_batch, free_memory, freeze, module_dtype, tensor_bytes, torch_dtype
from .flux2_klein_parts import (  # noqa: F401 (the family's surface: plan_shape, Flux2Variant, ...)
    DEFAULT_OUT_LAYERS, TINY_VLM_DIR, VARIANTS, Flux2Variant, build_tiny_flux2_klein, image_ids, pack, patchify,
    plan_shape, text_ids, unpack, unpatchify,
)
from .vlm import VLMEncoder, select_hidden_states

PIPELINE_CLASS = Flux2KleinPipeline
TEACHER_CONTEXTS = ("reference", "vlm")  # the released klein recipe's first (module docstring)
# The pipeline's subfolders that make contexts (the VAE encodes the reference image), with the
# teacher VLM's folder for "vlm": contexts.py fingerprints their files.
CONTEXT_FILES = ("text_encoder", "tokenizer", "vae")
INFERENCE_STEPS = 4  # klein's native few-step setting
PIXEL_MULTIPLE = 16  # image sides: VAE factor 8 x 2x2 patchify (the loaded family's pixel_multiple, read from its VAE)
# How users run the stock pipeline (jobs/sample.py): 4 steps, guidance 1.0 (distilled).
STOCK_SAMPLING = {"guidance_scale": 1.0, "num_inference_steps": INFERENCE_STEPS}
# Every attention and feed-forward projection of the double-stream blocks
# (transformer_blocks.N) and the single-stream blocks (single_transformer_blocks.N).
# peft matches list entries as name suffixes, without globs. The single blocks' output
# projection is attn.to_out, but the suffix "attn.to_out" (or "to_out") also matches the
# double blocks' attn.to_out ModuleList, which peft refuses with a ValueError; so it is
# named per block. peft skips entries that match nothing, so indices up to
# MAX_SINGLE_BLOCKS (diffusers' default, the largest FLUX.2) cover every variant.
MAX_SINGLE_BLOCKS = 48
LORA_TARGETS = [
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out",
    "attn.to_qkv_mlp_proj",
] + [f"single_transformer_blocks.{i}.attn.to_out" for i in range(MAX_SINGLE_BLOCKS)]
# Our LoRA modules under ComfyUI's native FLUX.2 names (weights.comfyui_lora). ComfyUI runs
# FLUX.2 as its Flux model (comfy/ldm/flux): transformer_blocks are double_blocks with q, k, v
# fused into img_attn.qkv and add_q/k/v_proj into txt_attn.qkv (rows q, k, v), single blocks keep
# our already fused linears as linear1 / linear2. Names as in ComfyUI's own diffusers conversion
# (comfy/utils.py flux_to_diffusers, which slices q, k, v rows the same way).
COMFYUI_BLOCKS = {"transformer_blocks": "double_blocks", "single_transformer_blocks": "single_blocks"}
COMFYUI_MODULES = {
    "attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.to_out.0": ("img_attn.proj", None), "attn.to_add_out": ("txt_attn.proj", None),
    "ff.linear_in": ("img_mlp.0", None), "ff.linear_out": ("img_mlp.2", None),
    "ff_context.linear_in": ("txt_mlp.0", None), "ff_context.linear_out": ("txt_mlp.2", None),
    "attn.to_qkv_mlp_proj": ("linear1", None), "attn.to_out": ("linear2", None),  # single blocks
}
DEFAULT_INSTRUCTION = "Make the main subject, background, and overall composition consistent with the reference image."
REFERENCE_T = 10  # the pipeline's _prepare_image_ids: the i-th reference image gets t = 10 + 10 * i
# The memory plan (dopsd_ray/plan.py) builds each component from its config.json on the meta device.
COMPONENT_CLASSES = {"transformer": Flux2Transformer2DModel, "text_encoder": Qwen3ForCausalLM, "vae": AutoencoderKLFlux2}


@dataclass
class Flux2Context:
    """Text features (B, L, n_layers * D) with their ids (B, L, 4), plus optional reference latents.

    reference: normalised, patchified reference-image latents (B, C, h', w') (the
    "reference" teacher context); None for the student and the VLM teacher.
    """

    prompt_embeds: torch.Tensor
    text_ids: torch.Tensor
    reference: torch.Tensor | None = None

    def to(self, device=None, dtype=None) -> "Flux2Context":
        reference = None if self.reference is None else self.reference.to(device=device, dtype=dtype)
        return Flux2Context(self.prompt_embeds.to(device=device, dtype=dtype), self.text_ids.to(device=device),
                            reference)

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]


# -- packing (the pipeline's layout, written once) ------------------------------------


class Flux2KleinFamily:
    name = "flux2_klein"

    def __init__(
        self,
        *,
        transformer: Flux2Transformer2DModel,
        vae: AutoencoderKLFlux2,
        text_encoder: Qwen3ForCausalLM,
        tokenizer,
        scheduler: FlowMatchEulerDiscreteScheduler,
        is_distilled: bool = True,
        teacher_context: str = "reference",
        teacher_vlm_path: str | None = None,
        max_sequence_length: int = 512,
        text_encoder_out_layers: Sequence[int] = DEFAULT_OUT_LAYERS,
        reference_instruction: str = DEFAULT_INSTRUCTION,
        teacher_max_sequence_length: int = 1024,
        vlm_min_pixels: int = 512 * 512,
        vlm_max_pixels: int = 768 * 768,
    ):
        if teacher_context not in TEACHER_CONTEXTS:
            raise ValueError(f"teacher_context must be one of {', '.join(TEACHER_CONTEXTS)}, got {teacher_context!r}")
        if teacher_context == "vlm" and teacher_vlm_path is None:
            raise ValueError("teacher_context='vlm' needs teacher_vlm_path (a Qwen3-VL checkpoint)")
        n_layers = text_encoder.config.num_hidden_layers
        if max(text_encoder_out_layers) > n_layers:
            raise ValueError(f"text_encoder_out_layers {tuple(text_encoder_out_layers)} exceed the text "
                             f"encoder's {n_layers} layers")
        self.transformer = transformer
        self.vae = freeze(vae)
        self.text_encoder = freeze(text_encoder)
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.is_distilled = is_distilled
        self.teacher_context_kind = teacher_context
        self.teacher_vlm_path = teacher_vlm_path
        self.max_sequence_length = max_sequence_length
        self.text_encoder_out_layers = tuple(text_encoder_out_layers)
        self.reference_instruction = reference_instruction
        self.teacher_max_sequence_length = teacher_max_sequence_length
        self.vlm_min_pixels = vlm_min_pixels
        self.vlm_max_pixels = vlm_max_pixels
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)  # as Flux2KleinPipeline
        self.pixel_multiple = self.vae_scale_factor * 2  # 2x2 patchify after the VAE
        self.latent_channels = transformer.config.in_channels  # 4 x the VAE's latent channels
        self._vlm: VLMEncoder | None = None

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        transformer_device: str | torch.device | None = None,
        teacher_vlm_path: str | Path | None = None,
        **settings,
    ) -> "Flux2KleinFamily":
        """Load a Flux2KleinPipeline directory or hub id; text encoder and VAE are frozen.

        settings: __init__'s keyword settings (teacher_context, max_sequence_length, ...),
        passed on as they are, so their defaults live in one place.
        teacher_vlm_path (only used with teacher_context="vlm", loaded on first use)
        defaults to default_teacher_vlm(path).
        transformer_device (default: device) is "cpu" on DeepSpeed learners, which place the
        transformer themselves.
        """
        pipe = Flux2KleinPipeline.from_pretrained(str(path), dtype=dtype)
        pipe.vae.to(device), pipe.text_encoder.to(device), pipe.transformer.to(transformer_device or device)
        if teacher_vlm_path is None:
            teacher_vlm_path = default_teacher_vlm(path)
        return cls(
            transformer=pipe.transformer, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
            scheduler=pipe.scheduler, is_distilled=bool(pipe.config.get("is_distilled", True)),
            teacher_vlm_path=None if teacher_vlm_path is None else str(teacher_vlm_path), **settings,
        )

    @property
    def device(self) -> torch.device:
        return self.vae.device  # (the encoders' too, until release_encoders)

    # -- contexts ----------------------------------------------------------------------

    def release_encoders(self) -> int:
        """Drop the text encoder and the VLM (which shares its language model); the VAE stays
        (it makes SFT's latents and decodes samples)."""
        freed = tensor_bytes(self.text_encoder, self._vlm.model if self._vlm else None)
        self.text_encoder = self._vlm = None
        free_memory()
        return freed

    def _encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Flux2KleinPipeline's prompt encoding: (B, L, n_layers * D) features, attention mask."""
        texts = [
            self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True, enable_thinking=False)
            for p in prompts
        ]
        tokens = self.tokenizer(texts, padding="max_length", max_length=self.max_sequence_length,
                                truncation=True, return_tensors="pt")
        mask = tokens.attention_mask.to(self.device)
        hidden = self.text_encoder(input_ids=tokens.input_ids.to(self.device), attention_mask=mask,
                                   output_hidden_states=True, use_cache=False).hidden_states
        # Layer-major within the feature axis, like the pipeline's stack(dim=1).permute(0, 2, 1, 3).
        return select_hidden_states(hidden, self.text_encoder_out_layers), mask

    @torch.no_grad()
    def student_context(self, captions: list[str]) -> Flux2Context:
        """Exactly Flux2KleinPipeline.encode_prompt(captions): padded features and text ids."""
        features, _ = self._encode_prompts(list(captions))
        return Flux2Context(features, text_ids(len(captions), features.shape[1], self.device))

    def teacher_caption(self, caption: str) -> str:
        """The reference recipe's teacher prompt: the caption, one space, the instruction."""
        return f"{caption.rstrip()} {self.reference_instruction}"

    @torch.no_grad()
    def teacher_context(self, captions: list[str], images: torch.Tensor) -> Flux2Context:
        """Context of (caption, target image): reference-image latents or VLM features (see module doc)."""
        images = self._as_batch(images)
        if len(captions) != images.shape[0]:
            raise ValueError(f"{len(captions)} captions for {images.shape[0]} images")
        if self.teacher_context_kind == "vlm":
            features = self._vlm_features(list(captions), images)
            return Flux2Context(features, text_ids(len(captions), features.shape[1], self.device))
        features, mask = self._encode_prompts([self.teacher_caption(c) for c in captions])
        if bool(mask[:, -1].any()):
            warnings.warn(
                f"a teacher prompt (caption + reference instruction) was truncated to max_sequence_length="
                f"{self.max_sequence_length} tokens: the instruction may be cut off", stacklevel=2)
        reference = self.encode_images(images)
        return Flux2Context(features, text_ids(len(captions), features.shape[1], self.device), reference)

    @property
    def vlm(self) -> VLMEncoder:
        """The VLM teacher encoder: Qwen3-VL with klein's text encoder as language model (loaded once)."""
        if self._vlm is None:
            if self.teacher_vlm_path is None:
                raise ValueError("the VLM teacher context needs teacher_vlm_path (a Qwen3-VL checkpoint)")
            vlm = VLMEncoder.from_pretrained(
                self.teacher_vlm_path, self.text_encoder, dtype=self.text_encoder.dtype, device=self.device,
                min_pixels=self.vlm_min_pixels, max_pixels=self.vlm_max_pixels)
            n_layers, joint_dim = len(self.text_encoder_out_layers), self.transformer.config.joint_attention_dim
            if vlm.hidden_size * n_layers != joint_dim:
                raise ValueError(f"VLM features {vlm.hidden_size * n_layers} (hidden {vlm.hidden_size} x {n_layers} "
                                 f"layers) != transformer joint_attention_dim {joint_dim}")
            self._vlm = vlm
        return self._vlm

    def _vlm_features(self, captions: list[str], images: torch.Tensor) -> torch.Tensor:
        """VLM hidden states at the out layers, (B, teacher_max_sequence_length, n_layers * D).

        The batch is padded with the pad token to the fixed teacher length and the pad
        positions are kept, as the pipeline keeps them for the student: the transformer
        has no text mask and was trained with pad-token features after the prompt.
        """
        encoder, length = self.vlm, self.teacher_max_sequence_length
        inputs = encoder.processor(captions, images, max_length=length)
        extra = length - inputs["input_ids"].shape[1]
        if extra > 0:
            side = (extra, 0) if encoder.processor.tokenizer.padding_side == "left" else (0, extra)
            pad_id = encoder.processor.tokenizer.pad_token_id
            inputs["input_ids"] = F.pad(inputs["input_ids"], side, value=pad_id)
            inputs["attention_mask"] = F.pad(inputs["attention_mask"], side, value=0)
            inputs["mm_token_type_ids"] = F.pad(inputs["mm_token_type_ids"], side, value=0)
        device = encoder.model.device
        inputs = {k: v.to(device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(encoder.model.dtype)
        out = encoder.model.model(**inputs, output_hidden_states=True, use_cache=False, return_dict=True)
        return select_hidden_states(out.hidden_states, self.text_encoder_out_layers).to(self.device)

    # -- the denoiser --------------------------------------------------------------------

    def velocity(self, model: nn.Module, x: torch.Tensor, sigma: torch.Tensor, context: Flux2Context) -> torch.Tensor:
        """v = eps - x0 in float32: pack x (+ reference tokens), call the transformer, unpack.

        Mirrors one step of Flux2KleinPipeline: timestep = (sigma * num_train_timesteps) / 1000
        (the pipeline's scheduler timestep / 1000), guidance None, output sliced to x's tokens.
        """
        b, _, h, w = x.shape
        if len(context) != b:
            raise ValueError(f"context has {len(context)} items for a batch of {b} latents")
        dtype = module_dtype(model)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(b)
        timestep = (sigma * self.scheduler.config.num_train_timesteps).to(dtype) / 1000
        tokens, ids = pack(x), image_ids(b, h, w, device=x.device)
        n = tokens.shape[1]
        if context.reference is not None:
            ref = context.reference.to(x.device)
            tokens = torch.cat([tokens, pack(ref.to(x.dtype))], dim=1)
            ids = torch.cat([ids, image_ids(b, ref.shape[2], ref.shape[3], t=REFERENCE_T, device=x.device)], dim=1)
        out = model(
            hidden_states=tokens.to(dtype), timestep=timestep, guidance=None,
            encoder_hidden_states=context.prompt_embeds.to(device=x.device, dtype=dtype),
            txt_ids=context.text_ids.to(x.device), img_ids=ids, return_dict=False,
        )[0]
        return unpack(out[:, :n].float(), h, w)

    # -- latents -------------------------------------------------------------------------

    def _bn_stats(self, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(device, dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(device, dtype)
        return mean, std

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> normalised patchified latents (B, 4c, H/16, W/16), float32.

        Uses the posterior MODE (mean), as the pipeline does for reference images, so x0
        and the reference context are deterministic.
        """
        images = self._as_batch(images)
        z = self.vae.encode(images.to(self.vae.device, self.vae.dtype)).latent_dist.mode()
        x = patchify(z)
        mean, std = self._bn_stats(x.device, x.dtype)
        return ((x - mean) / std).float()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised patchified latents -> images clamped to [-1, 1] (float32)."""
        x = latents.to(self.vae.device, self.vae.dtype)
        mean, std = self._bn_stats(x.device, x.dtype)
        z = unpatchify(x * std + mean)
        return self.vae.decode(z, return_dict=False)[0].float().clamp(-1, 1)

    def latent_shape(self, batch_size: int, height: int, width: int) -> tuple[int, ...]:
        return (batch_size, self.latent_channels, height // self.pixel_multiple, width // self.pixel_multiple)

    # -- schedules -----------------------------------------------------------------------

    def _mu(self, num_steps: int, height: int, width: int) -> float:
        """The pipeline's mu: compute_empirical_mu(number of image tokens, number of steps)."""
        _, _, h, w = self.latent_shape(1, height, width)
        return compute_empirical_mu(image_seq_len=h * w, num_steps=num_steps)

    def inference_sigmas(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        """Flux2KleinPipeline's sigmas for num_steps at this resolution, via a fresh copy of the scheduler."""
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        if scheduler.config.get("use_flow_sigmas", False):  # the pipeline lets the scheduler choose then
            sigmas = None
        scheduler.set_timesteps(num_steps, sigmas=sigmas, mu=self._mu(num_steps, height, width))
        return scheduler.sigmas.float().cpu()

    def shift_sigmas(self, sigmas: torch.Tensor, height: int, width: int, num_steps: int) -> torch.Tensor:
        """The scheduler's shift applied to uniform sigmas, as the pipeline shifts them for num_steps.

        Dynamic shifting (klein) uses the pipeline's mu, compute_empirical_mu(image tokens,
        num_steps): up to 4300 image tokens (1024 x 1024 is 4096) it depends on the number of
        steps, so shift_sigmas(linspace(1, 1/N, N), h, w, N) equals inference_sigmas(N, h, w)[:-1]
        for every N, and SFT's sampled sigmas take the run's algorithm.inference_steps, the
        sampler it will be deployed with. A static scheduler uses its `shift`.
        """
        sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
        if self.scheduler.config.use_dynamic_shifting:
            return self.scheduler.time_shift(self._mu(num_steps, height, width), 1.0, sigmas).float()
        return static_shift(sigmas, self.scheduler.config.shift)

    # -- previews and export -------------------------------------------------------------

    def pipeline(self, transformer: nn.Module | None = None) -> Flux2KleinPipeline:
        """A stock Flux2KleinPipeline over this family's components (its own scheduler state).

        Call it with max_sequence_length=family.max_sequence_length (and
        text_encoder_out_layers if not the default) to sample what the student sees.
        """
        return Flux2KleinPipeline(
            scheduler=type(self.scheduler).from_config(self.scheduler.config), vae=self.vae,
            text_encoder=self.text_encoder, tokenizer=self.tokenizer,
            transformer=transformer if transformer is not None else self.transformer,
            is_distilled=self.is_distilled,
        )

    def _as_batch(self, images) -> torch.Tensor:
        """Check, then return images as one (B, 3, H, W) tensor (a list of same-size (3, H, W) is stacked)."""
        self.check_images(images)
        return torch.stack(list(images)) if isinstance(images, (list, tuple)) else images

    def check_images(self, images: torch.Tensor) -> None:
        """(B, 3, H, W) floats in [-1, 1], sides multiples of pixel_multiple, one resolution per batch."""
        if isinstance(images, (list, tuple)):
            if not images or not all(isinstance(i, torch.Tensor) and i.dim() == 3 for i in images):
                raise ValueError("a list of images must hold (3, H, W) tensors")
            sizes = [tuple(i.shape[-2:]) for i in images]
            for k, size in enumerate(sizes):
                if size != sizes[0]:
                    raise ValueError(
                        f"all images of a batch must share one resolution (FLUX.2 uses the first item's "
                        f"position ids for the whole batch): item 0 is {sizes[0][0]}x{sizes[0][1]}, "
                        f"item {k} is {size[0]}x{size[1]} (HxW); bucket batches by resolution")
            for image in images:
                self.check_images(image.unsqueeze(0))
            return
        check_image_batch(images, self.pixel_multiple, "FLUX.2")


def default_teacher_vlm(path: str | Path) -> str | None:
    """The teacher VLM when none is configured: `path/teacher_vlm` (tiny builds), else the Qwen3-VL
    sibling of the variant whose joint_attention_dim the transformer has (VARIANTS), if any."""
    local = Path(path) / TINY_VLM_DIR
    if local.is_dir():
        return str(local)
    dim = Flux2Transformer2DModel.load_config(str(path), subfolder="transformer")["joint_attention_dim"]
    return next((v.teacher_vlm for v in VARIANTS.values() if v.joint_attention_dim == dim), None)


def from_config(model_cfg, path: str | Path, device: str | torch.device = "cpu",
                transformer_device: str | torch.device | None = None) -> Flux2KleinFamily:
    """The family with a ModelConfig's settings (families.load_family)."""
    return Flux2KleinFamily.from_pretrained(
        path, dtype=torch_dtype(model_cfg.dtype), device=device, transformer_device=transformer_device,
        teacher_context=model_cfg.teacher_context, teacher_vlm_path=model_cfg.teacher_vlm_path,
        max_sequence_length=model_cfg.max_sequence_length,
        teacher_max_sequence_length=model_cfg.teacher_max_sequence_length,
        vlm_min_pixels=model_cfg.vlm_min_pixels, vlm_max_pixels=model_cfg.vlm_max_pixels,
    )


def build_tiny(path: str | Path, seed: int, model_cfg) -> Path:
    """families.build_tiny's entry: model.variant picks the tiny variant's block counts."""
    return build_tiny_flux2_klein(path, seed=seed, variant=model_cfg.variant or "4b")
