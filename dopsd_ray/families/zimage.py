"""Z-Image-Turbo as a D-OPSD model family (diffusers ZImagePipeline components).

Z-Image's conventions, all hidden in this file (base.py speaks sigma / v = eps - x0):
- the transformer takes latents as a LIST of (C, 1, h, w) tensors and caption
  features as a list of variable-length (L_i, cap_feat_dim) tensors;
- its timestep is t = 1 - sigma (0 = pure noise) and its output is x0 - eps, MINUS the
  diffusers velocity;
- latents are VAE means normalised as (z - shift_factor) * scaling_factor; image sides
  are multiples of vae_scale_factor * 2 (16 for the real model, patch size 2);
- sigmas: linspace(1, 1/N, N) through the scheduler (static shift 3 for Turbo), then 0.

Student context: the pipeline's own prompt encoding (Qwen3 chat template with
enable_thinking=True, padded to max_sequence_length, hidden_states[-2], padding
stripped). Teacher context: Qwen3-VL features of (target image, caption) with the VLM's
language model overwritten by Z-Image's text encoder (vlm.py), hidden_states[-2],
padding stripped, up to teacher_max_sequence_length tokens.

Gradient checkpointing: `transformer.enable_gradient_checkpointing()` (diffusers
checkpoints every ZImageTransformerBlock); ZImageTransformerBlock is also the FSDP /
ZeRO-3 wrapping unit (the model's _no_split_modules).
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas
from torch import nn
from transformers import Qwen3Config, Qwen3Model

from ..algorithms.schedules import static_shift
from .base import check_image_batch, free_memory, freeze, module_dtype, tensor_bytes, torch_dtype
from .tiny_tokenizer import build_tiny_tokenizer
from .vlm import DEFAULT_VLM, VLMEncoder, build_tiny_vlm, strip_padding

PIPELINE_CLASS = ZImagePipeline
TEACHER_CONTEXTS = ("vlm",)
# The pipeline's subfolders that make contexts (with the teacher VLM's folder): contexts.py
# fingerprints their files.
CONTEXT_FILES = ("text_encoder", "tokenizer")
INFERENCE_STEPS = 8  # Turbo's 8 NFE
PIXEL_MULTIPLE = 16  # image sides: VAE factor 8 x patch 2 (the loaded family's pixel_multiple, read from its VAE)
# How users run the stock pipeline (jobs/sample.py): 8 steps, no CFG (guidance-distilled).
STOCK_SAMPLING = {"guidance_scale": 0.0, "num_inference_steps": INFERENCE_STEPS}
# Per block of noise_refiner.N, context_refiner.N and layers.N.
LORA_TARGETS = [
    "attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
    "feed_forward.w1", "feed_forward.w2", "feed_forward.w3",
]
# Our LoRA modules under ComfyUI's native Z-Image names (weights.comfyui_lora). ComfyUI runs
# Z-Image as its Lumina2 NextDiT (comfy/ldm/lumina/model.py): the same block lists, but q, k, v
# fused into one attention.qkv (rows q, k, v) and to_out.0 named attention.out. Part i of a fused
# module is its i-th row block; ComfyUI's own diffusers conversion (comfy/utils.py
# z_image_to_diffusers) slices the rows the same way.
COMFYUI_BLOCKS = {"layers": "layers", "noise_refiner": "noise_refiner", "context_refiner": "context_refiner"}
COMFYUI_MODULES = {
    "attention.to_q": ("attention.qkv", 0), "attention.to_k": ("attention.qkv", 1),
    "attention.to_v": ("attention.qkv", 2), "attention.to_out.0": ("attention.out", None),
    "feed_forward.w1": ("feed_forward.w1", None), "feed_forward.w2": ("feed_forward.w2", None),
    "feed_forward.w3": ("feed_forward.w3", None),
}
TINY_VLM_DIR = "teacher_vlm"  # where build_tiny_zimage puts the tiny teacher VLM
SEQ_MULTI_OF = 32  # the transformer pads captions to a multiple of this
# The memory plan (dopsd_ray/plan.py) builds each component from its config.json on the meta device.
COMPONENT_CLASSES = {"transformer": ZImageTransformer2DModel, "text_encoder": Qwen3Model, "vae": AutoencoderKL}


def plan_shape(config: dict) -> tuple[int, int, int]:
    """(hidden size, transformer blocks, image pixels per token) of a transformer config.json, for the
    plan's activation estimate: the refiners (noise and context) count as blocks; VAE /8, patch 2."""
    return config["dim"], config["n_layers"] + 2 * config["n_refiner_layers"], 8 * config["all_patch_size"][0]


@dataclass
class ZImageContext:
    """Caption features for the Z-Image transformer: one (L_i, cap_feat_dim) tensor per item."""

    features: list[torch.Tensor]

    def to(self, device=None, dtype=None) -> "ZImageContext":
        return ZImageContext([f.to(device=device, dtype=dtype) for f in self.features])

    def __len__(self) -> int:
        return len(self.features)


class ZImageFamily:
    name = "zimage"

    def __init__(
        self,
        *,
        transformer: ZImageTransformer2DModel,
        vae: AutoencoderKL,
        text_encoder: Qwen3Model,
        tokenizer,
        scheduler: FlowMatchEulerDiscreteScheduler,
        teacher_vlm_path: str,
        max_sequence_length: int = 512,
        teacher_max_sequence_length: int = 1024,
        vlm_min_pixels: int = 512 * 512,
        vlm_max_pixels: int = 768 * 768,
    ):
        self.transformer = transformer
        self.vae = freeze(vae)
        self.text_encoder = freeze(text_encoder)
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.teacher_vlm_path = teacher_vlm_path
        self.max_sequence_length = max_sequence_length
        self.teacher_max_sequence_length = teacher_max_sequence_length
        self.vlm_min_pixels = vlm_min_pixels
        self.vlm_max_pixels = vlm_max_pixels
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)  # as ZImagePipeline
        self.pixel_multiple = self.vae_scale_factor * 2
        self.latent_channels = transformer.config.in_channels
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
    ) -> "ZImageFamily":
        """Load a ZImagePipeline directory or hub id. The teacher VLM loads on first use.

        settings: __init__'s keyword settings (max_sequence_length, ...), passed on as they
        are, so their defaults live in one place.
        teacher_vlm_path defaults to default_teacher_vlm(path). transformer_device (default: device) is "cpu"
        on DeepSpeed learners, which place the transformer themselves.
        """
        pipe = ZImagePipeline.from_pretrained(str(path), dtype=dtype)
        pipe.vae.to(device), pipe.text_encoder.to(device), pipe.transformer.to(transformer_device or device)
        if teacher_vlm_path is None:
            teacher_vlm_path = default_teacher_vlm(path)
        return cls(
            transformer=pipe.transformer, vae=pipe.vae, text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer, scheduler=pipe.scheduler, teacher_vlm_path=str(teacher_vlm_path), **settings,
        )

    @property
    def device(self) -> torch.device:
        return self.vae.device  # (the encoders' too, until release_encoders)

    # -- contexts ----------------------------------------------------------------------

    def release_encoders(self) -> int:
        """Drop the text encoder and the VLM (which shares its language model); the VAE stays."""
        freed = tensor_bytes(self.text_encoder, self._vlm.model if self._vlm else None)
        self.text_encoder = self._vlm = None
        free_memory()
        return freed

    @torch.no_grad()
    def student_context(self, captions: list[str]) -> ZImageContext:
        """Exactly ZImagePipeline's prompt encoding."""
        texts = [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": caption}], tokenize=False, add_generation_prompt=True,
                enable_thinking=True)
            for caption in captions
        ]
        tokens = self.tokenizer(texts, padding="max_length", max_length=self.max_sequence_length,
                                truncation=True, return_tensors="pt")
        input_ids = tokens.input_ids.to(self.device)
        mask = tokens.attention_mask.to(self.device).bool()
        hidden = self.text_encoder(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states
        return ZImageContext(strip_padding(hidden[-2], mask))

    @property
    def vlm(self) -> VLMEncoder:
        """The teacher encoder: Qwen3-VL with Z-Image's text encoder as language model (loaded once)."""
        if self._vlm is None:
            vlm = VLMEncoder.from_pretrained(
                self.teacher_vlm_path, self.text_encoder, dtype=self.text_encoder.dtype, device=self.device,
                min_pixels=self.vlm_min_pixels, max_pixels=self.vlm_max_pixels)
            cap_feat_dim = self.transformer.config.cap_feat_dim
            if vlm.hidden_size != cap_feat_dim:
                raise ValueError(f"VLM hidden size {vlm.hidden_size} != transformer cap_feat_dim {cap_feat_dim}")
            self._vlm = vlm
        return self._vlm

    @torch.no_grad()
    def teacher_context(self, captions: list[str], images: torch.Tensor) -> ZImageContext:
        """VLM features of (target image, caption): hidden_states[-2], padding removed."""
        self.check_images(images)
        features = self.vlm.encode(captions, images, hidden_state_layers=-2,
                                   max_length=self.teacher_max_sequence_length)
        self._check_caption_lengths(features)
        return ZImageContext(features)

    def _check_caption_lengths(self, features: list[torch.Tensor]) -> None:
        # The transformer pads captions to a multiple of 32 and places the image tokens
        # after them on RoPE axis 0, whose table has axes_lens[0] entries.
        limit = self.transformer.config.axes_lens[0]
        for i, f in enumerate(features):
            padded = -(-len(f) // SEQ_MULTI_OF) * SEQ_MULTI_OF
            if padded + 1 >= limit:
                raise ValueError(
                    f"context item {i} has {len(f)} tokens (padded to {padded}); the transformer's RoPE axis 0 "
                    f"holds {limit} positions, so at most {(limit - 2) // SEQ_MULTI_OF * SEQ_MULTI_OF} fit: lower "
                    "the teacher max sequence length or the VLM's max pixels")

    # -- the denoiser --------------------------------------------------------------------

    def velocity(self, model: nn.Module, x: torch.Tensor, sigma: torch.Tensor, context: ZImageContext) -> torch.Tensor:
        """v = eps - x0 in float32 from Z-Image's (t = 1 - sigma, output = x0 - eps) transformer."""
        dtype = module_dtype(model)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        # 1 - sigma, with the pipeline's exact float32 arithmetic (t = 1000 * sigma; (1000 - t) / 1000).
        timestep = sigma * self.scheduler.config.num_train_timesteps
        t = (1000 - timestep) / 1000
        latents = list(x.to(dtype).unsqueeze(2).unbind(0))  # B x (C, 1, h, w)
        features = [f.to(device=x.device, dtype=dtype) for f in context.features]
        out = model(latents, t, features, return_dict=False)[0]
        return -torch.stack([o.float() for o in out]).squeeze(2)

    # -- latents -------------------------------------------------------------------------

    def _vae_shift(self) -> float:
        return self.vae.config.shift_factor or 0.0

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> normalised latents. Uses the posterior MEAN (mode), not a
        sample, so x0 is deterministic (the VAE's std is tiny; SFT scripts often sample)."""
        self.check_images(images)
        z = self.vae.encode(images.to(self.vae.device, self.vae.dtype)).latent_dist.mode()
        return ((z - self._vae_shift()) * self.vae.config.scaling_factor).float()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> images clamped to [-1, 1] (float32)."""
        z = latents.to(self.vae.device, self.vae.dtype) / self.vae.config.scaling_factor + self._vae_shift()
        return self.vae.decode(z, return_dict=False)[0].float().clamp(-1, 1)

    def latent_shape(self, batch_size: int, height: int, width: int) -> tuple[int, ...]:
        h = 2 * (height // self.pixel_multiple)
        w = 2 * (width // self.pixel_multiple)
        return (batch_size, self.latent_channels, h, w)

    # -- schedules -----------------------------------------------------------------------

    def _mu(self, height: int, width: int) -> float:
        """ZImagePipeline's resolution-dependent mu (used only by dynamically shifting schedulers)."""
        _, _, h, w = self.latent_shape(1, height, width)
        cfg = self.scheduler.config
        return calculate_shift(
            (h // 2) * (w // 2), cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))

    def inference_sigmas(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        """The pipeline's sigmas: its default linspace(1, 1/N, N) through a fresh copy of the scheduler."""
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        scheduler.set_timesteps(sigmas=get_default_z_image_sigmas(num_steps), mu=self._mu(height, width))
        return scheduler.sigmas.float().cpu()

    def shift_sigmas(self, sigmas: torch.Tensor, height: int, width: int, num_steps: int) -> torch.Tensor:
        """The scheduler's own shift (static `shift`, or time_shift with mu when dynamic);
        neither depends on num_steps.

        Only the shift: shift_terminal / karras-style conversions, which Z-Image does not
        configure, act on whole schedules and are not applied to sampled sigmas.
        """
        sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
        if self.scheduler.config.use_dynamic_shifting:
            return self.scheduler.time_shift(self._mu(height, width), 1.0, sigmas).float()
        return static_shift(sigmas, self.scheduler.shift)

    # -- previews and export -------------------------------------------------------------

    def pipeline(self, transformer: nn.Module | None = None) -> ZImagePipeline:
        """A stock ZImagePipeline over this family's components (its own scheduler state)."""
        return ZImagePipeline(
            scheduler=type(self.scheduler).from_config(self.scheduler.config), vae=self.vae,
            text_encoder=self.text_encoder, tokenizer=self.tokenizer,
            transformer=transformer if transformer is not None else self.transformer,
        )

    def check_images(self, images: torch.Tensor) -> None:
        check_image_batch(images, self.pixel_multiple, "Z-Image")


def default_teacher_vlm(path: str | Path) -> str:
    """The teacher VLM when none is configured: `path/teacher_vlm` (tiny builds), else Qwen3-VL-4B."""
    local = Path(path) / TINY_VLM_DIR
    return str(local) if local.is_dir() else DEFAULT_VLM


def from_config(model_cfg, path: str | Path, device: str | torch.device = "cpu",
                transformer_device: str | torch.device | None = None) -> ZImageFamily:
    """The family with a ModelConfig's settings (families.load_family)."""
    return ZImageFamily.from_pretrained(
        path, dtype=torch_dtype(model_cfg.dtype), device=device, transformer_device=transformer_device,
        teacher_vlm_path=model_cfg.teacher_vlm_path, max_sequence_length=model_cfg.max_sequence_length,
        teacher_max_sequence_length=model_cfg.teacher_max_sequence_length,
        vlm_min_pixels=model_cfg.vlm_min_pixels, vlm_max_pixels=model_cfg.vlm_max_pixels,
    )


# -- tiny builder ----------------------------------------------------------------------


def build_tiny(path: str | Path, seed: int, model_cfg) -> Path:
    """families.build_tiny's entry: nothing in the config changes Z-Image's tiny build."""
    return build_tiny_zimage(path, seed=seed)


def build_tiny_zimage(path: str | Path, seed: int = 0) -> Path:
    """A tiny random Z-Image pipeline (plus its tiny teacher VLM) saved under `path`.

    Sizes fit fast CPU tests: transformer dim 32, Qwen3 hidden 16, 4-level VAE with 16
    latent channels (pixel_multiple 16); captions up to ~200 tokens fit RoPE axis 0, so
    use max sequence lengths around 64 / 128 and 32-64 px images.
    """
    path = Path(path)
    tokenizer = build_tiny_tokenizer()
    text_config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        text_encoder = Qwen3Model(text_config)
        transformer = ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
            n_heads=2, n_kv_heads=2, cap_feat_dim=text_config.hidden_size, axes_dims=[4, 6, 6],
            axes_lens=[256, 64, 64],
        )
        with torch.no_grad():  # diffusers may leave these uninitialised (torch.empty) -> NaN outputs
            transformer.x_pad_token.normal_(std=0.02)
            transformer.cap_pad_token.normal_(std=0.02)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16, 16, 16),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1, norm_num_groups=8, scaling_factor=0.3611, shift_factor=0.1159,
            use_quant_conv=False, use_post_quant_conv=False,
        )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)
    pipe.save_pretrained(path, safe_serialization=True)
    build_tiny_vlm(text_config, tokenizer, path / TINY_VLM_DIR, seed=seed + 1)
    return path
