"""The toy family: a small pixel-space diffusion model built from real diffusers /
transformers classes, for the CPU miniature of the paper (dopsd_ray/toy/).

- denoiser: diffusers UNet2DConditionModel with cross-attention, predicting the
  velocity v = eps - x0 directly, timestep = 1000 * sigma;
- no VAE: latents are the pixels in [-1, 1], space-to-depth'ed 2x2 (pixel_unshuffle),
  an exact invertible "autoencoder" that makes a 32 x 32 RGB image a 12 x 16 x 16 latent
  (4x cheaper for the UNet); pixel_multiple = 2 * the UNet's 2 ** downsamplings;
- student context: caption tokens from a small frozen Qwen3 text encoder
  (a word-level tokenizer over the toy world's words, padded to max_sequence_length,
  last hidden state, padding masked out in cross-attention);
- teacher context: the caption tokens followed by image tokens of the target image from
  a small frozen CLIP vision encoder (patch tokens + class token, post-layernorm) - the
  toy's "VLM features of (image, caption)";
- sigmas: linspace(1, 0, N + 1) with a static shift of 3 (SHIFT), like Z-Image's
  scheduler: 4 steps are 1, .9, .75, .5, 0 - the released recipe's grid. The last step
  jumps from sigma .5 to the image, which a multi-step flow model cannot do without
  blurring the world's fine speckle; the step-distilled student can.

The committed base (models/toy, built by jobs/build_toy_base.py) is a 4-step distilled
student of a flow-matching model; `build_tiny_toy` makes a random one of the same shape.
This file knows nothing of the toy world (dopsd_ray/toy/ builds on it, not the other way):
its words and image size come in as arguments, or from a saved model.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, PreTrainedTokenizerFast, Qwen3Config, Qwen3Model

from ..algorithms.schedules import static_shift
from .base import check_image_batch, free_memory, freeze, module_dtype, tensor_bytes, torch_dtype

# The committed toy base and its concept images (README, "The miniature"): model.path and
# data.path when a family=toy recipe sets none (families.complete).
TOY_BASE_DIR = DEFAULT_PATH = Path(__file__).resolve().parents[2] / "models" / "toy"
TOY_CONCEPT_DIR = DEFAULT_DATA = Path(__file__).resolve().parents[2] / "data" / "toy_concept"

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]
TEACHER_CONTEXTS = ("image_tokens",)  # caption tokens + image tokens of the target
CONTEXT_FILES = ("text_encoder", "tokenizer", "vision_encoder")  # what makes contexts (contexts.py fingerprints it)
INFERENCE_STEPS = 4
PIXEL_MULTIPLE = 8  # image sides: PATCH x the UNet's 2 ** 2 downsamplings (ToyFamily.pixel_multiple)
COMFYUI_BLOCKS = COMFYUI_MODULES = None  # the toy UNet is no ComfyUI model: a diffusers-format LoRA file only
HIDDEN = 64  # text and image token width = the UNet's cross_attention_dim
SHIFT = 3.0  # static timestep shift of the schedule (module docstring)


@dataclass
class ToyContext:
    """Tokens for cross-attention: features (B, L, HIDDEN) and a (B, L) mask of real tokens."""

    features: torch.Tensor
    mask: torch.Tensor

    def to(self, device=None, dtype=None) -> "ToyContext":
        return ToyContext(self.features.to(device=device, dtype=dtype), self.mask.to(device=device))

    def __len__(self) -> int:
        return len(self.features)


class ToyPipeline:
    """The toy has no stock diffusers pipeline; this gives it the LoRA file format of the
    UNet pipelines (keys prefixed `unet.`), loadable with `unet.load_lora_adapter(path, prefix="unet")`."""

    @classmethod
    def save_lora_weights(cls, save_directory, transformer_lora_layers, transformer_lora_adapter_metadata=None,
                          safe_serialization: bool = True):
        StableDiffusionLoraLoaderMixin.save_lora_weights(
            save_directory, unet_lora_layers=transformer_lora_layers,
            unet_lora_adapter_metadata=transformer_lora_adapter_metadata, safe_serialization=safe_serialization)


PIPELINE_CLASS = ToyPipeline


def build_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over `words` (unknown words -> <unk>)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")


PATCH = 2  # pixel_unshuffle factor: latents are (3 * PATCH ** 2, H / PATCH, W / PATCH)


def build_unet(image_size: int, block_out_channels=(32, 64, 64)) -> UNet2DConditionModel:
    channels = 3 * PATCH * PATCH
    return UNet2DConditionModel(
        sample_size=image_size // PATCH, in_channels=channels, out_channels=channels, layers_per_block=1,
        block_out_channels=tuple(block_out_channels), norm_num_groups=16,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=HIDDEN, attention_head_dim=16,
    )


def build_encoders(tokenizer, image_size: int, seed: int = 0) -> tuple[Qwen3Model, CLIPVisionModel]:
    """Random frozen encoders. The vision patch embedding is initialised at unit gain so the
    image content, not the position embedding, dominates its tokens."""
    text_config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    vision_config = CLIPVisionConfig(
        image_size=image_size, patch_size=8, num_channels=3, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
        num_hidden_layers=1, num_attention_heads=4)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        text_encoder = Qwen3Model(text_config)
        with torch.no_grad():
            text_encoder.embed_tokens.weight.normal_(std=1.0)
        vision = CLIPVisionModel(vision_config)
        patch = vision.embeddings.patch_embedding
        with torch.no_grad():
            patch.weight.normal_(std=(1.0 / patch.weight[0].numel()) ** 0.5)
    return text_encoder, vision


class ToyFamily:
    name = "toy"

    def __init__(self, *, transformer: UNet2DConditionModel, text_encoder: Qwen3Model, vision_encoder: CLIPVisionModel,
                 tokenizer, max_sequence_length: int = 12):
        self.transformer = transformer
        self.text_encoder = freeze(text_encoder)
        self.vision_encoder = freeze(vision_encoder)
        self.tokenizer = tokenizer
        self.max_sequence_length = max_sequence_length
        self.pixel_multiple = PATCH * 2 ** (len(transformer.config.block_out_channels) - 1)
        self.image_size = vision_encoder.config.image_size  # the side the vision encoder reads
        self.device = text_encoder.device  # where pixels (the latents) go; it outlives release_encoders

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, *, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", transformer_device: str | torch.device | None = None,
                        max_sequence_length: int = 12) -> "ToyFamily":
        path = Path(path or TOY_BASE_DIR)
        if not (path / "unet").is_dir():
            raise FileNotFoundError(f"{path} is not a toy model directory (no unet/); rebuild the committed base "
                                    "with `python jobs/build_toy_base.py` or use model.tiny=true")
        load = {"torch_dtype": dtype}
        return cls(
            transformer=UNet2DConditionModel.from_pretrained(path / "unet", **load).to(transformer_device or device),
            text_encoder=Qwen3Model.from_pretrained(path / "text_encoder", **load).to(device),
            vision_encoder=CLIPVisionModel.from_pretrained(path / "vision_encoder", **load).to(device),
            tokenizer=PreTrainedTokenizerFast.from_pretrained(path / "tokenizer"),
            max_sequence_length=max_sequence_length,
        )

    def save_pretrained(self, path: str | Path, transformer: nn.Module | None = None) -> Path:
        path = Path(path)
        (transformer or self.transformer).save_pretrained(path / "unet", safe_serialization=True)
        self.text_encoder.save_pretrained(path / "text_encoder", safe_serialization=True)
        self.vision_encoder.save_pretrained(path / "vision_encoder", safe_serialization=True)
        self.tokenizer.save_pretrained(path / "tokenizer")
        (path / "model_index.json").write_text(json.dumps({"family": "toy", "image_size": self.image_size}) + "\n")
        return path

    # -- contexts ----------------------------------------------------------------------

    def release_encoders(self) -> int:
        """Drop the text and vision encoders (the toy has no VAE: nothing else is frozen)."""
        freed = tensor_bytes(self.text_encoder, self.vision_encoder)
        self.text_encoder = self.vision_encoder = None
        free_memory()
        return freed

    @torch.no_grad()
    def student_context(self, captions: list[str]) -> ToyContext:
        tokens = self.tokenizer(list(captions), padding="max_length", max_length=self.max_sequence_length,
                                truncation=True, return_tensors="pt")
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        features = self.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        return ToyContext(features.float(), mask.bool())

    @torch.no_grad()
    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 1 + patches, HIDDEN) from the frozen vision encoder."""
        x = images.to(self.device, self.vision_encoder.dtype)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="area")
        out = self.vision_encoder(pixel_values=x).last_hidden_state
        return self.vision_encoder.post_layernorm(out).float()

    @torch.no_grad()
    def teacher_context(self, captions: list[str], images: torch.Tensor) -> ToyContext:
        """Caption tokens followed by the target image's tokens."""
        self.check_images(images)
        text = self.student_context(captions)
        image = self.image_tokens(images)
        mask = torch.ones(image.shape[:2], dtype=torch.bool, device=image.device)
        return ToyContext(torch.cat([text.features, image], 1), torch.cat([text.mask, mask], 1))

    # -- the denoiser --------------------------------------------------------------------

    def velocity(self, model: nn.Module, x: torch.Tensor, sigma: torch.Tensor, context: ToyContext) -> torch.Tensor:
        dtype = module_dtype(model)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        out = model(x.to(dtype), sigma * 1000, encoder_hidden_states=context.features.to(x.device, dtype),
                    encoder_attention_mask=context.mask.to(x.device), return_dict=False)[0]
        return out.float()

    # -- latents: the pixels, space-to-depth ---------------------------------------------------

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        return F.pixel_unshuffle(images.float().to(self.device), PATCH)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(latents.float(), PATCH).clamp(-1, 1)

    def latent_shape(self, batch_size: int, height: int, width: int) -> tuple[int, ...]:
        return (batch_size, 3 * PATCH * PATCH, height // PATCH, width // PATCH)

    # -- schedules -----------------------------------------------------------------------

    def inference_sigmas(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        return self.shift_sigmas(torch.linspace(1.0, 0.0, num_steps + 1), height, width, num_steps)

    def shift_sigmas(self, sigmas: torch.Tensor, height: int, width: int, num_steps: int) -> torch.Tensor:
        """The static shift: the same for every resolution and number of steps."""
        return static_shift(sigmas, SHIFT)

    # -- previews and export -------------------------------------------------------------

    def pipeline(self) -> ToyPipeline:
        return ToyPipeline()

    def check_images(self, images: torch.Tensor) -> None:
        check_image_batch(images, self.pixel_multiple, "the toy UNet")


def from_config(model_cfg, path: str | Path, device: str | torch.device = "cpu",
                transformer_device: str | torch.device | None = None) -> ToyFamily:
    """The family with a ModelConfig's settings (families.load_family)."""
    return ToyFamily.from_pretrained(path, dtype=torch_dtype(model_cfg.dtype), device=device,
                                     transformer_device=transformer_device,
                                     max_sequence_length=model_cfg.max_sequence_length)


def build_tiny(path: str | Path, seed: int, model_cfg) -> Path:
    """families.build_tiny's entry: nothing in the config changes the toy's tiny build."""
    return build_tiny_toy(path, seed=seed)


def build_tiny_toy(path: str | Path, seed: int = 0, block_out_channels=(16, 16, 16), like: str | Path = TOY_BASE_DIR
                   ) -> Path:
    """A random toy model (untrained, smaller UNet) saved under `path`, loadable with from_pretrained.

    It has the tokenizer (the toy world's words) and image size of the saved model `like`
    (the committed base), so it reads the same captions and images as the real one.
    """
    like = Path(like)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(like / "tokenizer")
    image_size = json.loads((like / "model_index.json").read_text())["image_size"]
    text_encoder, vision = build_encoders(tokenizer, image_size, seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed + 1)
        unet = build_unet(image_size, block_out_channels)
    return ToyFamily(transformer=unet, text_encoder=text_encoder, vision_encoder=vision,
                     tokenizer=tokenizer).save_pretrained(path)
