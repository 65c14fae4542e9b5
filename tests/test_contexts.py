"""The context cache (data.cache_contexts): same losses, encoders gone, never used for other inputs.

The end-to-end run with the cache on (rollout worker and learner both reading it) is
tests/test_runtime.py's on-policy run, which must reproduce the colocated run's losses.
"""

import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from dopsd_ray.algorithms.schedules import training_sigmas
from dopsd_ray.algorithms.steps import Batch, colocated_loss
from dopsd_ray.recipes import load_config
from dopsd_ray.contexts import (
    CONTEXT_SETTINGS, CachedContexts, ContextCacheMiss, cached_contexts, entry_name, fill_context_cache,
    fingerprint_parts,
)
from dopsd_ray.data.batches import collate
from dopsd_ray.families import load_family, lora_targets
from dopsd_ray.families.base import tensor_bytes
from dopsd_ray.families.flux2_klein import build_tiny_flux2_klein
from dopsd_ray.families.toy import build_tiny_toy
from dopsd_ray.families.zimage import build_tiny_zimage
from dopsd_ray.preview import ValidationSet, student_samples, teacher_samples
from dopsd_ray.weights import make_weights

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
TOY = ["model.family=toy", "model.max_sequence_length=12", "algorithm.training_sigmas=inference"]
FLUX = ["model.family=flux2_klein", "model.max_sequence_length=160", "algorithm.training_sigmas=inference"]
# name: (config overrides, tiny builder, image height and width, the encoders release_encoders drops)
FAMILIES = {
    "zimage-vlm": ([], build_tiny_zimage, 64, 64, lambda f: [f.text_encoder, f.vlm.model]),
    "toy": (TOY, build_tiny_toy, 32, 32, lambda f: [f.text_encoder, f.vision_encoder]),
    "flux2_klein-reference": (FLUX, build_tiny_flux2_klein, 32, 48, lambda f: [f.text_encoder]),
}
CAPTIONS = ["a red circle", "a blue square on grass", "a red circle"]  # two images share a caption


def rows(height: int, width: int, seed: int = 0) -> list[dict]:
    """Decoded data rows (data/stream.py) of random images."""
    g = np.random.default_rng(seed)
    return [{"id": str(i), "pixels": g.integers(0, 256, (height, width, 3), dtype=np.uint8), "height": height,
             "width": width, "caption": caption} for i, caption in enumerate(CAPTIONS)]


def fill(cfg, model_path, data, root):
    return fill_context_cache(cfg.model_dump(mode="json"), str(model_path), data, str(root))


@pytest.mark.parametrize("name", FAMILIES)
def test_cached_contexts_give_the_same_losses_and_samples_and_the_encoders_are_freed(name, tmp_path):
    overrides, build, height, width, encoders = FAMILIES[name]
    cfg = load_config(TINY, overrides)
    path = build(tmp_path / "model", seed=0)
    data = rows(height, width)
    cache = fill(cfg, path, data, tmp_path / "cache")
    assert (cache.entries, cache.computed) == (5, 5)  # 2 captions, 3 (caption, image) pairs

    plain = load_family(cfg.model, path)
    family = load_family(cfg.model, path)
    dropped = encoders(family)
    freed, refs = tensor_bytes(*dropped), [weakref.ref(m) for m in dropped]
    del dropped
    cached = cached_contexts(family, cache)
    assert cached.released_bytes == freed > 0
    assert all(ref() is None for ref in refs)  # the modules are gone, not just moved
    assert cached.device == plain.device

    images, captions, ids = collate(data[1:])  # one batch of two pairs
    sigmas = training_sigmas(cfg.algorithm.training_sigmas, plain, height, width, cfg.algorithm.inference_steps)
    results = []
    for f in (plain, cached):
        torch.manual_seed(0)
        weights = make_weights(f.transformer, cfg.lora, lora_targets(cfg.model.family))
        loss, _ = colocated_loss(f, weights, Batch(images, captions, ids, index=3), sigmas, cfg.algorithm)
        val = ValidationSet(captions, [0, 1], height, width, images)  # a sample grid of the two pairs
        results.append((loss.item(), student_samples(f, weights.model, val, 2), teacher_samples(f, weights, val, 2)))
    (loss_plain, *samples_plain), (loss_cached, *samples_cached) = results
    assert loss_cached == pytest.approx(loss_plain, rel=1e-6, abs=1e-9)
    for a, b in zip(samples_plain, samples_cached):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)  # decoded images in [-1, 1]: float noise
    assert cached.hits == 8  # 2 student + 2 teacher contexts, for the loss and for the samples

    with pytest.raises(ContextCacheMiss, match="no student context for caption 'a green triangle'"):
        cached.student_context(["a green triangle"])
    other = images.flip(-1)  # the same captions with other pixels
    with pytest.raises(ContextCacheMiss, match="no teacher context for caption 'a blue square on grass' and its"):
        cached.teacher_context(captions, other)


def test_sft_reads_its_latents_from_the_cache_and_other_images_from_the_vae(tmp_path):
    cfg = load_config(TINY, ["algorithm.name=sft"])
    path = build_tiny_zimage(tmp_path / "model", seed=0)
    data = rows(64, 64)
    cache = fill(cfg, path, data, tmp_path / "cache")
    assert (cache.entries, cache.computed) == (8, 8)  # + 3 images' latents
    plain = load_family(cfg.model, path)
    cached = cached_contexts(load_family(cfg.model, path), cache)
    images, captions, ids = collate(data[1:])
    torch.testing.assert_close(cached.encode_images(images), plain.encode_images(images), rtol=1e-5, atol=1e-6)
    assert cached.latent_hits == 2
    other = images.flip(-1)  # not a training image: the VAE encodes it
    torch.testing.assert_close(cached.encode_images(other), plain.encode_images(other), rtol=1e-5, atol=1e-6)
    assert cached.latent_hits == 2
    # the SFT loss is the same with cached latents and contexts
    sigmas = training_sigmas(cfg.algorithm.training_sigmas, plain, 64, 64, cfg.algorithm.inference_steps)
    losses = []
    for f in (plain, cached):
        torch.manual_seed(0)
        weights = make_weights(f.transformer, cfg.lora, lora_targets(cfg.model.family))
        losses.append(colocated_loss(f, weights, Batch(images, captions, ids, index=1), sigmas, cfg.algorithm)[0].item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert cached.latent_hits == 4


def flip_byte(path: Path, offset: int = -5) -> None:
    """Change one byte of a file's last bytes (a weight, for safetensors), keeping its size."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_the_fingerprint_changes_with_every_input_of_a_context_and_only_those(tmp_path):
    toy = build_tiny_toy(tmp_path / "toy")
    cfg = load_config(TINY, TOY)
    base, memo = fingerprint_parts(cfg.model, str(toy), {})

    def changed(model=cfg.model, path=toy):
        parts, _ = fingerprint_parts(model, str(path), memo)
        return sorted(k for k in parts.keys() | base.keys() if parts.get(k) != base.get(k))

    assert changed() == []
    values = {"family": "zimage", "dtype": "bfloat16", "max_sequence_length": 10,
              "teacher_max_sequence_length": 100, "teacher_context": "other", "vlm_min_pixels": 17,
              "vlm_max_pixels": 8000}
    assert set(values) == set(CONTEXT_SETTINGS)
    for key, value in values.items():
        if key in ("family", "teacher_context"):  # these also change which files count (below)
            continue
        assert changed(cfg.model.model_copy(update={key: value})) == [f"setting model.{key}"], key
    flip_byte(toy / "text_encoder" / "model.safetensors")  # same size; a new mtime: read again
    assert changed() == ["model file text_encoder/model.safetensors"]
    flip_byte(toy / "tokenizer" / "tokenizer.json", offset=-2)
    assert len(changed()) == 2
    flip_byte(toy / "unet" / "diffusion_pytorch_model.safetensors")  # the denoiser makes no context
    assert len(changed()) == 2

    # a file whose size and mtime match the memo is not read again (a 4B text encoder is 8 GB)
    real = str((toy / "vision_encoder" / "model.safetensors").resolve())
    parts, _ = fingerprint_parts(cfg.model, str(toy), {**memo, real: memo[real][:2] + ["remembered"]})
    assert parts["model file vision_encoder/model.safetensors"] == "remembered"

    # the teacher VLM's files count where the teacher context is the VLM's
    zimage = build_tiny_zimage(tmp_path / "zimage")
    zcfg = load_config(TINY)
    before, _ = fingerprint_parts(zcfg.model, str(zimage), {})
    assert "teacher VLM file model.safetensors" in before and "model file text_encoder/model.safetensors" in before
    flip_byte(zimage / "teacher_vlm" / "model.safetensors")
    after, _ = fingerprint_parts(zcfg.model, str(zimage), {})
    assert [k for k in before if before[k] != after[k]] == ["teacher VLM file model.safetensors"]
    flux = build_tiny_flux2_klein(tmp_path / "flux")
    fcfg = load_config(TINY, FLUX)
    reference, _ = fingerprint_parts(fcfg.model, str(flux), {})
    vlm, _ = fingerprint_parts(fcfg.model.model_copy(update={"teacher_context": "vlm"}), str(flux), {})
    assert not any(k.startswith("teacher VLM") for k in reference) and "model file vae/config.json" in reference
    assert "teacher VLM file model.safetensors" in vlm and vlm["setting model.teacher_context"] == '"vlm"'


def test_entry_keys_change_with_caption_pixels_resolution_and_fingerprint(tmp_path):
    image = torch.rand(3, 32, 32) * 2 - 1
    key = entry_name("f1", "teacher", "a red circle", image)
    assert key == entry_name("f1", "teacher", "a red circle", image.clone())
    others = [
        entry_name("f1", "teacher", "a red circle.", image),
        entry_name("f1", "teacher", "a red circle", image.flip(-1)),
        entry_name("f1", "teacher", "a red circle",
                   torch.nn.functional.interpolate(image[None], size=(48, 48))[0]),
        entry_name("f2", "teacher", "a red circle", image),
        entry_name("f1", "student", "a red circle"),
    ]
    assert len({key, *others}) == 6


def test_a_cache_filled_for_other_weights_or_data_is_refilled_and_never_read(tmp_path, capsys):
    toy = build_tiny_toy(tmp_path / "toy")
    cfg = load_config(TINY, TOY)
    root = tmp_path / "cache"
    first = fill(cfg, toy, rows(32, 32), root)
    again = fill(cfg, toy, rows(32, 32), root)  # a resumed run: nothing to compute
    assert again.fingerprint == first.fingerprint and (again.entries, again.computed) == (5, 0)

    flip_byte(toy / "text_encoder" / "model.safetensors")
    capsys.readouterr()
    refilled = fill(cfg, toy, rows(32, 32), root)
    assert "filled for another model file text_encoder/model.safetensors; emptying it" in capsys.readouterr().out
    assert refilled.fingerprint != first.fingerprint and refilled.computed == refilled.entries == 5
    assert len(list(root.glob("*/*.safetensors"))) == 5  # the old entries are gone
    family = load_family(cfg.model, toy)
    with pytest.raises(ValueError, match=f"holds {refilled.fingerprint[:12]}, not the fill's {first.fingerprint[:12]}"):
        CachedContexts(family, first)

    # other images (here another resolution): their teacher contexts are computed, the old ones dropped
    resized = fill(cfg, toy, rows(40, 40), root)
    assert (resized.entries, resized.computed) == (5, 3)
    assert len(list(root.glob("teacher/*.safetensors"))) == 3
