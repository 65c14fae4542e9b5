"""The Qwen3-VL teacher encoder: multimodal features of (target image, caption).

D-OPSD's VLM teacher context (docs/method.md, "Teacher contexts" 1) is a Qwen3-VL whose
language model is the diffusion model's own Qwen3 text encoder, so its features live
in the space the denoiser was trained on. Its ViT and connector stay as released.

The language model SHARES the text encoder's parameters (the same nn.Parameter
objects) instead of holding a copy: a copy would be a second language model on the
GPU, the whole decoder's size (at Qwen3-4B in bf16, about 8 GB). The VLM is loaded
on the CPU, its own language model is swapped for the text encoder's parameters and
freed there, and only then is the rest (ViT, connector) moved to the device. Sharing
also means in-place changes to the text encoder's weights reach the VLM; both are
frozen in D-OPSD, so that never happens in training.

    encoder = VLMEncoder.from_pretrained(vlm_path, text_encoder, min_pixels=512 * 512, max_pixels=768 * 768)
    feats = encoder.encode(captions, images, hidden_state_layers=-2, max_length=1024)   # Z-Image
    feats = encoder.encode(captions, images, hidden_state_layers=(9, 18, 27))            # FLUX.2 stacking
    # feats: list of (L_i, D * n_layers) tensors, padding removed

The processor needs no torchvision: the tokenizer plus the PIL Qwen2-VL image
processor, and the <|image_pad|> expansion written out here (the stock Qwen3-VL
processor insists on a video processor, which needs torchvision).
"""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import AutoTokenizer, Qwen3VLConfig, Qwen3VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

DEFAULT_VLM = "Qwen/Qwen3-VL-4B-Instruct"
IMAGE_TOKEN = "<|image_pad|>"

LayerSpec = int | Sequence[int]


def select_hidden_states(hidden_states: Sequence[torch.Tensor], layers: LayerSpec) -> torch.Tensor:
    """One layer (an int, e.g. -2 for Z-Image) or several concatenated along features.

    Several layers come out as (B, L, n_layers * D), layer-major within the feature axis:
    the same order as FLUX.2's stack(dim=1).permute(0, 2, 1, 3).reshape(B, L, -1).
    """
    if isinstance(layers, int):
        return hidden_states[layers]
    return torch.cat([hidden_states[k] for k in layers], dim=-1)


def strip_padding(features: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
    """(B, L, D) padded features -> list of (L_i, D) with the padded positions removed."""
    mask = attention_mask.bool()
    return [features[i][mask[i]] for i in range(features.shape[0])]


# -- processor --------------------------------------------------------------------


def images_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> RGB PIL images (uint8, as the VLM sees files from disk)."""
    pixels = ((images.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return [Image.fromarray(np.ascontiguousarray(p.permute(1, 2, 0).numpy()), mode="RGB") for p in pixels]


class VLMProcessor:
    """Chat template + image patches for Qwen3-VL, without a video processor (so no torchvision).

    One user turn with content [image, caption], no system prompt, add_generation_prompt=True.
    Each image's single <|image_pad|> is expanded to grid_t * grid_h * grid_w / merge^2 tokens.
    """

    def __init__(self, tokenizer, image_processor: Qwen2VLImageProcessorPil):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    @classmethod
    def from_pretrained(cls, path: str | Path, min_pixels: int, max_pixels: int) -> "VLMProcessor":
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        # min_pixels / max_pixels as well as size: legacy min_pixels / max_pixels keys in a
        # preprocessor_config.json would otherwise silently override `size`.
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(
            str(path), size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
            min_pixels=min_pixels, max_pixels=max_pixels)
        size = image_processor.size
        if (size.shortest_edge, size.longest_edge) != (min_pixels, max_pixels):
            raise ValueError(f"could not set the VLM image processor to {min_pixels}..{max_pixels} pixels: {size}")
        return cls(tokenizer, image_processor)

    def image_tokens(self, grid_thw: torch.Tensor) -> int:
        return int(grid_thw.prod()) // self.image_processor.merge_size ** 2

    def __call__(self, captions: list[str], images: torch.Tensor, max_length: int) -> dict[str, torch.Tensor]:
        if len(captions) != images.shape[0]:
            raise ValueError(f"{len(captions)} captions for {images.shape[0]} images")
        vision = self.image_processor(images_to_pil(images), return_tensors="pt")
        texts = []
        for caption, grid in zip(captions, vision["image_grid_thw"]):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": caption}]}]
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            if text.count(IMAGE_TOKEN) != 1:
                raise ValueError(f"the VLM chat template should yield one {IMAGE_TOKEN}, got: {text!r}")
            texts.append(text.replace(IMAGE_TOKEN, IMAGE_TOKEN * self.image_tokens(grid)))
        tokens = self.tokenizer(texts, padding="longest", max_length=max_length, truncation=True, return_tensors="pt")
        input_ids = tokens["input_ids"]
        for i, grid in enumerate(vision["image_grid_thw"]):
            kept, wanted = int((input_ids[i] == self.image_token_id).sum()), self.image_tokens(grid)
            if kept != wanted:
                raise ValueError(
                    f"the image of item {i} needs {wanted} tokens but only {kept} fit in max_length={max_length}: "
                    "raise the teacher max sequence length or lower the VLM's max_pixels")
        return {
            "input_ids": input_ids,
            "attention_mask": tokens["attention_mask"],
            "mm_token_type_ids": (input_ids == self.image_token_id).to(torch.int32),  # text 0, image 1
            "pixel_values": vision["pixel_values"],
            "image_grid_thw": vision["image_grid_thw"],
        }


# -- model --------------------------------------------------------------------------


def load_vlm(path: str | Path, dtype: torch.dtype = torch.float32):
    """Qwen3VLForConditionalGeneration from a hub id or a local directory, on the CPU, frozen in eval mode.

    On the CPU so that its language model can be swapped for the text encoder's
    (share_language_model) before the rest goes to the device.
    """
    vlm = Qwen3VLForConditionalGeneration.from_pretrained(str(path), dtype=dtype)
    return vlm.eval().requires_grad_(False)


def language_model_state(text_encoder: nn.Module, keep_vars: bool = False) -> dict[str, torch.Tensor]:
    """A Qwen3 text encoder's decoder weights under Qwen3Model's names.

    Accepts transformers' Qwen3Model (Z-Image: embed_tokens..., layers..., norm) and
    Qwen3ForCausalLM (FLUX.2: model.embed_tokens..., lm_head); the LM head is not part
    of the decoder and is dropped (features never use it). keep_vars=True gives the
    nn.Parameter objects themselves (to share them) instead of detached tensors.
    """
    state = text_encoder.state_dict(keep_vars=keep_vars)
    if any(k.startswith("model.") for k in state):
        return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    return {k: v for k, v in state.items() if not k.startswith("lm_head.")}


@torch.no_grad()
def share_language_model(vlm: Qwen3VLForConditionalGeneration, text_encoder: nn.Module) -> None:
    """Make the VLM's language model use the text encoder's parameters (shared, not copied).

    All keys, shapes and dtypes must match. Every parameter of vlm.model.language_model
    is replaced by the text encoder's nn.Parameter, as is any other VLM parameter tied
    to it (a tied lm_head), so the VLM's own copy is left unreferenced and freed.
    Non-persistent buffers (the rotary inv_freq) stay the VLM's; persistent buffers are
    copied. The shared parameters keep the text encoder's device and requires_grad.
    """
    lm = vlm.model.language_model
    source = language_model_state(text_encoder, keep_vars=True)
    target = lm.state_dict(keep_vars=True)
    missing = sorted(set(target) - set(source))
    unexpected = sorted(set(source) - set(target))
    shapes = sorted(
        f"{k}: text encoder {tuple(source[k].shape)} vs VLM {tuple(target[k].shape)}"
        for k in set(source) & set(target) if source[k].shape != target[k].shape
    )
    # load_state_dict used to cast; a shared tensor cannot be, and mixed dtypes break the forward.
    dtypes = sorted(
        f"{k}: text encoder {source[k].dtype} vs VLM {target[k].dtype}"
        for k in set(source) & set(target) if source[k].dtype != target[k].dtype
    )
    if missing or unexpected or shapes or dtypes:
        def listed(name, keys):
            return f"\n  {name} ({len(keys)}): " + ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else "") if keys else ""

        raise ValueError(
            "the text encoder's weights do not match the VLM's language model "
            f"({type(text_encoder).__name__} -> {type(lm).__name__}):"
            + listed("only in the VLM", missing) + listed("only in the text encoder", unexpected)
            + listed("shape mismatches", shapes)
            + listed("dtype mismatches (load the VLM in the text encoder's dtype)", dtypes)
            + "\nThe VLM must be the Qwen3-VL sibling of the text encoder (e.g. Qwen3-VL-4B for Qwen3-4B)."
        )
    # Old VLM parameter -> the text encoder's, keyed by identity so that ties are followed.
    shared = {id(p): source[name] for name, p in lm.named_parameters(remove_duplicate=False)}
    for name, p in list(vlm.named_parameters(remove_duplicate=False)):
        if id(p) in shared:
            owner, _, attr = name.rpartition(".")
            setattr(vlm.get_submodule(owner), attr, shared[id(p)])
    parameters = {name for name, _ in lm.named_parameters(remove_duplicate=False)}
    for name, buffer in target.items():
        if name not in parameters:
            buffer.copy_(source[name])


class VLMEncoder:
    """A frozen Qwen3-VL (language model shared with a given text encoder) and its processor."""

    def __init__(self, model: Qwen3VLForConditionalGeneration, processor: VLMProcessor):
        self.model = model
        self.processor = processor

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        text_encoder: nn.Module | None,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        min_pixels: int = 512 * 512,
        max_pixels: int = 768 * 768,
    ) -> "VLMEncoder":
        """Load the VLM and its processor; with `text_encoder`, the VLM's LM shares its parameters.

        The text encoder must already be on `device`: moving the VLM there would
        otherwise move the shared parameters, i.e. the caller's text encoder, too.
        """
        model = load_vlm(path, dtype=dtype)
        if text_encoder is not None:
            share_language_model(model, text_encoder)
            target = torch.empty(0, device=device).device  # "cuda" -> cuda:<current>, as .to() resolves it
            elsewhere = {p.device for p in model.model.language_model.parameters()} - {target}
            if elsewhere:
                raise ValueError(f"the text encoder is on {sorted(map(str, elsewhere))} but the VLM goes to "
                                 f"{target}: put the text encoder on {target} first (the VLM shares its weights)")
        # Only the ViT and connector move: the shared parameters are on `device` already, and
        # the VLM's own language model was freed on the CPU above.
        model = model.to(device)
        return cls(model, VLMProcessor.from_pretrained(path, min_pixels=min_pixels, max_pixels=max_pixels))

    @property
    def hidden_size(self) -> int:
        return self.model.config.text_config.hidden_size

    @torch.no_grad()
    def encode(
        self,
        captions: list[str],
        images: torch.Tensor,
        hidden_state_layers: LayerSpec = -2,
        max_length: int = 1024,
    ) -> list[torch.Tensor]:
        """Features of (image, caption) pairs, padding removed: a list of (L_i, D * n_layers).

        images: (B, 3, H, W) in [-1, 1]. The processor resizes each to min..max pixels.
        """
        device = self.model.device
        inputs = self.processor(captions, images, max_length=max_length)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        # The bare multimodal model: hidden states without the (vocab-sized) LM head.
        out = self.model.model(**inputs, output_hidden_states=True, use_cache=False, return_dict=True)
        features = select_hidden_states(out.hidden_states, hidden_state_layers)
        return strip_padding(features, inputs["attention_mask"])


# -- tiny builder --------------------------------------------------------------------


def mrope_section(head_dim: int) -> list[int]:
    """Split head_dim / 2 rotary frequencies into (t, h, w) like Qwen3-VL's [24, 20, 20] of 64."""
    half = head_dim // 2
    hw = half * 20 // 64
    return [half - 2 * hw, hw, hw]


def build_tiny_vlm(text_encoder_config, tokenizer, path: str | Path, seed: int = 0) -> Path:
    """A tiny random Qwen3-VL whose language model matches `text_encoder_config` (a Qwen3Config).

    Saved with save_pretrained (safetensors) together with the tokenizer and the image
    processor config, so it loads through the same from_pretrained path as the real one.
    """
    path = Path(path)
    te = text_encoder_config
    head_dim = te.head_dim
    text_config = {
        "vocab_size": te.vocab_size,
        "hidden_size": te.hidden_size,
        "intermediate_size": te.intermediate_size,
        "num_hidden_layers": te.num_hidden_layers,
        "num_attention_heads": te.num_attention_heads,
        "num_key_value_heads": te.num_key_value_heads,
        "head_dim": head_dim,
        "rms_norm_eps": te.rms_norm_eps,
        "max_position_embeddings": te.max_position_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5_000_000.0,
                            "mrope_section": mrope_section(head_dim), "mrope_interleaved": True},
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision_depth = 2
    vision_config = {
        "depth": vision_depth,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": te.hidden_size,
        "num_position_embeddings": 64,  # an 8 x 8 grid, interpolated to any image size
        "deepstack_visual_indexes": list(range(min(vision_depth, te.num_hidden_layers))),
    }
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in [
        ("image_token_id", IMAGE_TOKEN), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    config = Qwen3VLConfig(text_config=text_config, vision_config=vision_config, tie_word_embeddings=False, **ids)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen3VLForConditionalGeneration(config)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    Qwen2VLImageProcessorPil(
        patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
    ).save_pretrained(path)
    return path
