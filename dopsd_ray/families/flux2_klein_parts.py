"""FLUX.2-klein's shapes, token layout and tiny random build: the parts of the family that need
no loaded model (flux2_klein.py, the family itself, imports them from here).

    VARIANTS            the released klein checkpoints (4b, 9b) and their tiny block counts
    patchify, pack ...  latents <-> the transformer's token sequence, and its position ids
    build_tiny_flux2_klein(path)   a tiny random pipeline (plus its tiny teacher VLM)
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
from transformers import Qwen3Config, Qwen3ForCausalLM

from .tiny_tokenizer import build_tiny_tokenizer
from .vlm import build_tiny_vlm

DEFAULT_OUT_LAYERS = (9, 18, 27)  # the pipeline's text_encoder_out_layers
TINY_VLM_DIR = "teacher_vlm"  # where build_tiny_flux2_klein puts the tiny teacher VLM


def plan_shape(config: dict) -> tuple[int, int, int]:
    """(hidden size, transformer blocks, image pixels per token) of a transformer config.json, for the
    plan's activation estimate: double- and single-stream blocks alike; VAE /8, 2x2 patchify, patch 1."""
    return (config["num_attention_heads"] * config["attention_head_dim"],
            config["num_layers"] + config["num_single_layers"], 16 * config.get("patch_size", 1))


@dataclass(frozen=True)
class Flux2Variant:
    """A released klein checkpoint (shapes from docs/families.md; the code reads them from the checkpoint)."""

    hub_id: str
    num_layers: int  # double-stream blocks
    num_single_layers: int
    joint_attention_dim: int  # 3 out layers x the text encoder's hidden size
    text_encoder: str
    teacher_vlm: str  # the Qwen3-VL sibling of the text encoder (VLM teacher context)
    tiny_layers: tuple[int, int]  # (double, single) blocks of the tiny random build


VARIANTS = {
    "4b": Flux2Variant("black-forest-labs/FLUX.2-klein-4B", 5, 20, 7680, "Qwen/Qwen3-4B",
                       "Qwen/Qwen3-VL-4B-Instruct", (1, 2)),
    "9b": Flux2Variant("black-forest-labs/FLUX.2-klein-9B", 8, 24, 12288, "Qwen/Qwen3-8B",
                       "Qwen/Qwen3-VL-8B-Instruct", (2, 3)),
}


def patchify(z: torch.Tensor) -> torch.Tensor:
    """VAE latents (B, c, H, W) -> (B, 4c, H/2, W/2); channel index = c * 4 + dy * 2 + dx."""
    b, c, h, w = z.shape
    return z.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unpatchify(x: torch.Tensor) -> torch.Tensor:
    """Inverse of patchify: (B, 4c, h, w) -> (B, c, 2h, 2w)."""
    b, c4, h, w = x.shape
    return x.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, h * 2, w * 2)


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> tokens (B, h * w, C), row-major over (y, x)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h * w).transpose(1, 2)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Tokens (B, h * w, C) -> (B, C, h, w)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)


def image_ids(batch_size: int, h: int, w: int, t: int = 0, device=None) -> torch.Tensor:
    """Ids (B, h * w, 4) = (t, y, x, 0) in pack's token order (t = 0 noisy latents, 10 a reference)."""
    ids = torch.cartesian_prod(torch.tensor([t]), torch.arange(h), torch.arange(w), torch.arange(1))
    return ids.unsqueeze(0).expand(batch_size, -1, -1).to(device)


def text_ids(batch_size: int, length: int, device=None) -> torch.Tensor:
    """Ids (B, L, 4) = (0, 0, 0, l) for caption tokens."""
    ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(length))
    return ids.unsqueeze(0).expand(batch_size, -1, -1).to(device)


def build_tiny_flux2_klein(path: str | Path, seed: int = 0, variant: str = "4b") -> Path:
    """A tiny random FLUX.2-klein pipeline (plus its tiny teacher VLM) saved under `path`.

    Sizes fit fast CPU tests: transformer 2 heads x 16 (the variant sets the number of
    double / single blocks, VARIANTS[variant].tiny_layers), Qwen3 hidden 16 with 28
    layers so the pipeline's default out layers (9, 18, 27) apply unchanged, a 4-level
    VAE with 32 latent channels (128 after patchify, pixel_multiple 16) and non-trivial
    BatchNorm statistics. The tiny tokenizer is byte-level (one token per character):
    the reference teacher prompt needs a max sequence length of ~160 to keep the whole
    instruction. Use 32-64 px images.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown FLUX.2-klein variant {variant!r}; known: {', '.join(VARIANTS)}")
    path = Path(path)
    n_double, n_single = VARIANTS[variant].tiny_layers
    tokenizer = build_tiny_tokenizer()
    text_config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=28,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    latent_channels = 32
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        text_encoder = Qwen3ForCausalLM(text_config)
        transformer = Flux2Transformer2DModel(
            patch_size=1, in_channels=latent_channels * 4, num_layers=n_double, num_single_layers=n_single,
            attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=text_config.hidden_size * len(DEFAULT_OUT_LAYERS), timestep_guidance_channels=32,
            axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
        )
        vae = AutoencoderKLFlux2(
            in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 16, 16, 16),
            layers_per_block=1, norm_num_groups=8, use_quant_conv=True, use_post_quant_conv=True,
        )
        with torch.no_grad():  # fresh BatchNorm stats are (0, 1): make the normalisation do something
            vae.bn.running_mean.normal_(std=0.2)
            vae.bn.running_var.uniform_(0.5, 2.0)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential",
    )
    pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer, is_distilled=True)
    pipe.save_pretrained(path, safe_serialization=True)
    build_tiny_vlm(text_config, tokenizer, path / TINY_VLM_DIR, seed=seed + 1)
    return path
