"""Evaluation metrics from embedding models the user supplies as local from_pretrained folders
(no weights ship with this project, and nothing is downloaded: local_files_only).

    clip = Embedder.from_pretrained(cfg.eval.clip_path, "eval.clip_path")   # transformers CLIPModel
    dino = Embedder.from_pretrained(cfg.eval.dino_path, "eval.dino_path")   # DINOv2 / DINOv3 (AutoModel)
    metrics = [PromptAlignment(clip), ReferenceSimilarity(clip, references, "clip_i"),
               ReferenceSimilarity(dino, references, "dino"), FrechetDistance(backbone, references)]

Each is an evaluation.Metric (samples by kind -> numbers):
- clip_t: cosine of each sample's CLIP image embedding with its own prompt's text embedding
  (prompt alignment), mean over every kind's samples;
- clip_i, dino: cosine of each concept sample (kinds train and heldout) with each training
  image, mean over all pairs: concept fidelity, DreamBooth's CLIP-I and DINO (DINO: the CLS
  token after the final layer norm, the models' pooler_output);
- fd: the Frechet distance (FID's formula) between the pooled features of every sample and of
  the training images. FID proper reads Inception-v3 features, a class none of the installed
  libraries has; with a DINOv2 folder this is FD-DINOv2. Its reference set is the training
  images, so it means most for full fine-tuning on many images.
Samples are scored as the 8-bit images a user would save (grid.tensor_to_pil), preprocessed by
the folder's own image processor.
"""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

from .grid import tensor_to_pil

CHUNK = 32  # images or texts per forward
CONCEPT_KINDS = ("train", "heldout")


def check_weights_path(path: str, key: str) -> None:
    """ValueError naming `key` unless `path` is a local from_pretrained folder."""
    if not Path(path).is_dir():
        raise ValueError(f"{key}={path!r}: no such directory; give a local from_pretrained folder "
                         "(nothing is downloaded here)")
    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"{key}={path!r} has no config.json: give a folder written by save_pretrained")


class Embedder:
    """A vision (or CLIP) model with its image processor (and tokenizer): pooled embeddings."""

    def __init__(self, model, image_processor, tokenizer=None, device: str | torch.device = "cpu"):
        self.model = model.eval().requires_grad_(False).to(device)
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.device = torch.device(device)

    @classmethod
    def from_pretrained(cls, path: str, key: str, device: str | torch.device = "cpu") -> "Embedder":
        check_weights_path(path, key)
        try:
            model = AutoModel.from_pretrained(path, local_files_only=True)
            processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
            tokenizer = (AutoTokenizer.from_pretrained(path, local_files_only=True)
                         if hasattr(model, "get_text_features") else None)
        except (OSError, ValueError) as err:
            raise ValueError(f"{key}={path!r}: cannot load it ({str(err).splitlines()[0]})") from None
        return cls(model, processor, tokenizer, device)

    @torch.no_grad()
    def images(self, images) -> torch.Tensor:
        """(N, D) float32 CPU embeddings of images: a (N, 3, H, W) tensor in [-1, 1] or PIL images."""
        pil = [tensor_to_pil(x) for x in images] if isinstance(images, torch.Tensor) else list(images)
        dtype = next(self.model.parameters()).dtype
        out = []
        for i in range(0, len(pil), CHUNK):
            pixels = self.image_processor(images=pil[i:i + CHUNK], return_tensors="pt").pixel_values
            pixels = pixels.to(self.device, dtype)
            if hasattr(self.model, "get_image_features"):  # CLIP: the projected image embedding
                features = self.model.get_image_features(pixel_values=pixels)
            else:  # DINOv2 / v3 and other backbones: the pooled (CLS) output
                features = self.model(pixel_values=pixels)
            out.append(_pooled(features).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        """(N, D) float32 CPU CLIP text embeddings (the text tower's projected EOS token)."""
        if self.tokenizer is None:
            raise ValueError(f"{type(self.model).__name__} has no text tower: CLIP-T needs a CLIP folder")
        limit = self.model.config.text_config.max_position_embeddings
        out = []
        for i in range(0, len(texts), CHUNK):
            tokens = self.tokenizer(texts[i:i + CHUNK], padding=True, truncation=True, max_length=limit,
                                    return_tensors="pt").to(self.device)
            features = self.model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
            out.append(_pooled(features).float().cpu())
        return torch.cat(out)


def _pooled(output) -> torch.Tensor:
    """transformers 4 returns CLIP features as a tensor, 5 as an output with pooler_output."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, M) cosine similarities of rows of a with rows of b."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two feature sets (N, D), in float64.
    A singular product (fewer samples than dimensions) gets 1e-6 on the diagonals, as pytorch-fid does."""
    from scipy import linalg

    x, y = a.double().numpy(), b.double().numpy()
    mu_x, mu_y = x.mean(0), y.mean(0)
    s_x, s_y = np.atleast_2d(np.cov(x, rowvar=False)), np.atleast_2d(np.cov(y, rowvar=False))
    root = linalg.sqrtm(s_x @ s_y)
    if not np.isfinite(root).all():
        offset = np.eye(len(s_x)) * 1e-6
        root = linalg.sqrtm((s_x + offset) @ (s_y + offset))
    return float(((mu_x - mu_y) ** 2).sum() + np.trace(s_x) + np.trace(s_y) - 2 * np.trace(root.real))


def _concept_images(samples: dict) -> torch.Tensor | None:
    kinds = [k for k in CONCEPT_KINDS if k in samples]
    return torch.cat([samples[k].images for k in kinds]) if kinds else None


class PromptAlignment:
    """clip_t: each sample's CLIP image embedding against its own prompt's, mean cosine."""

    def __init__(self, clip: Embedder):
        self.clip = clip

    def __call__(self, samples: dict) -> dict[str, float]:
        images = self.clip.images(torch.cat([s.images for s in samples.values()]))
        texts = self.clip.texts([p for s in samples.values() for p in s.prompts])
        return {"clip_t": cosine(images, texts).diagonal().mean().item()}


class ReferenceSimilarity:
    """clip_i / dino: concept samples against the training images, mean cosine over all pairs."""

    def __init__(self, embedder: Embedder, references: list, name: str):
        self.embedder, self.name = embedder, name
        self.references = embedder.images(references)

    def __call__(self, samples: dict) -> dict[str, float]:
        images = _concept_images(samples)
        if images is None:
            return {}
        return {self.name: cosine(self.embedder.images(images), self.references).mean().item()}


class FrechetDistance:
    """fd: Frechet distance of every sample's pooled features to the training images'."""

    def __init__(self, embedder: Embedder, references: list, name: str = "fd"):
        self.embedder, self.name = embedder, name
        self.references = embedder.images(references)

    def __call__(self, samples: dict) -> dict[str, float]:
        features = self.embedder.images(torch.cat([s.images for s in samples.values()]))
        return {self.name: frechet_distance(features, self.references)}
