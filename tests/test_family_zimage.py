"""The Z-Image family against the stock diffusers pipeline, on a tiny random model."""

import copy
import pickle

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline
from peft import LoraConfig

from dopsd_ray.algorithms.sampling import euler_sample
from dopsd_ray.families.zimage import LORA_TARGETS, ZImageContext, ZImageFamily

CAPTIONS = ("a red square", "a blue triangle on grass")
H, W = 32, 48  # not square, to catch height/width swaps


@pytest.fixture(scope="module")
def family(tiny_zimage_dir):
    return ZImageFamily.from_pretrained(
        tiny_zimage_dir, max_sequence_length=64, teacher_max_sequence_length=128,
        vlm_min_pixels=32 * 32, vlm_max_pixels=64 * 64)


def images(seed: int, batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, H, W, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_few_step_sample_matches_stock_pipeline(family, tiny_zimage_dir):
    noise = torch.randn(family.latent_shape(2, H, W), generator=torch.Generator().manual_seed(0))
    context = family.student_context(list(CAPTIONS))
    sigmas = family.inference_sigmas(8, H, W)
    latents = euler_sample(lambda x, s: family.velocity(family.transformer, x, s, context), noise, sigmas)
    ours = (family.decode_latents(latents) + 1) / 2  # the pipeline's "pt" range [0, 1]

    stock = ZImagePipeline.from_pretrained(tiny_zimage_dir)
    kwargs = dict(height=H, width=W, num_inference_steps=8, guidance_scale=0.0, output_type="pt",
                  max_sequence_length=64)
    # list(...): ZImagePipeline writes the chat-templated prompts back into the list it is given
    expected = stock(list(CAPTIONS), latents=noise.clone(), **kwargs).images
    assert ours.shape == expected.shape == (2, 3, H, W)
    assert (ours - expected).abs().max().item() <= 1e-5


def test_pipeline_is_stock_over_the_family_components(family):
    pipe = family.pipeline()
    assert type(pipe) is ZImagePipeline and pipe.transformer is family.transformer
    assert pipe.text_encoder is family.text_encoder and pipe.vae is family.vae
    assert pipe.scheduler is not family.scheduler  # its set_timesteps must not touch ours
    other = copy.deepcopy(family.transformer)
    assert family.pipeline(other).transformer is other


def test_inference_sigmas_are_the_turbo_schedule(family):
    sigmas = family.inference_sigmas(8, 1024, 1024)
    expected = torch.tensor([1.0, 0.9545, 0.9, 0.8333, 0.75, 0.6429, 0.5, 0.3, 0.0])
    assert sigmas.dtype == torch.float32 and sigmas.shape == (9,)
    assert torch.allclose(sigmas, expected, atol=1e-4)
    # the scheduler was not left in a stepped state by computing them
    assert family.scheduler.config.shift == 3.0


def test_shift_sigmas_reproduce_the_scheduler(family):
    uniform = torch.linspace(1.0, 1 / 8, 8)
    assert torch.allclose(family.shift_sigmas(uniform, H, W, 8), family.inference_sigmas(8, H, W)[:-1], atol=1e-6)
    # a dynamically shifting scheduler: mu from the resolution, as ZImagePipeline computes it
    dynamic = copy.copy(family)
    dynamic.scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=1.0)
    for h, w in [(256, 256), (1024, 1024)]:
        assert torch.allclose(dynamic.shift_sigmas(uniform, h, w, 8), dynamic.inference_sigmas(8, h, w)[:-1],
                              atol=1e-6)
    assert not torch.allclose(dynamic.inference_sigmas(8, 256, 256), dynamic.inference_sigmas(8, 1024, 1024))


def test_student_context_is_the_pipeline_prompt_encoding(family):
    context = family.student_context(list(CAPTIONS))
    expected, _ = family.pipeline().encode_prompt(list(CAPTIONS), do_classifier_free_guidance=False,
                                                  max_sequence_length=64)
    assert isinstance(context, ZImageContext) and len(context) == 2
    assert [tuple(f.shape) for f in context.features] == [tuple(e.shape) for e in expected]
    assert context.features[0].shape[0] < context.features[1].shape[0] < 64  # padding stripped
    for ours, theirs in zip(context.features, expected):
        assert torch.equal(ours, theirs)


def test_teacher_context_depends_on_the_image(family):
    a, b = images(1), images(2)
    ca, ca_again, cb = (family.teacher_context(list(CAPTIONS), x) for x in (a, a, b))
    assert all(f.shape[-1] == family.transformer.config.cap_feat_dim for f in ca.features)
    assert all(torch.equal(x, y) for x, y in zip(ca.features, ca_again.features))
    assert not any(torch.allclose(x, y) for x, y in zip(ca.features, cb.features))

    x = torch.randn(family.latent_shape(2, H, W), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        va, vb = (family.velocity(family.transformer, x, torch.tensor(0.75), c) for c in (ca, cb))
    assert va.dtype == torch.float32 and va.shape == x.shape
    assert not torch.allclose(va, vb)


def test_teacher_vlm_language_model_is_the_text_encoder(family):
    vlm_lm = family.vlm.model.model.language_model.state_dict()
    text_encoder = family.text_encoder.state_dict()
    assert vlm_lm.keys() == text_encoder.keys()
    for key, value in text_encoder.items():
        assert torch.equal(vlm_lm[key], value), key
    assert not any(p.requires_grad for p in family.vlm.model.parameters())
    assert not any(p.requires_grad for p in family.text_encoder.parameters())
    assert not any(p.requires_grad for p in family.vae.parameters())


def test_velocity_is_minus_the_transformer_output_at_one_minus_sigma(family):
    context = family.student_context(list(CAPTIONS))
    x = torch.randn(family.latent_shape(2, H, W), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        v = family.velocity(family.transformer, x, torch.tensor(0.3), context)
        v_batched = family.velocity(family.transformer, x, torch.tensor([0.3, 0.3]), context)
        raw = family.transformer(list(x.unsqueeze(2).unbind(0)), torch.tensor([0.7, 0.7]), context.features,
                                 return_dict=False)[0]
    assert torch.equal(v, v_batched)
    assert torch.allclose(v, -torch.stack(raw).squeeze(2), atol=1e-5)


def test_latents_use_the_vae_normalisation(family):
    x = images(5)
    latents = family.encode_images(x)
    assert latents.shape == family.latent_shape(2, H, W)
    cfg = family.vae.config
    with torch.no_grad():
        mean = family.vae.encode(x).latent_dist.mean
        decoded = family.vae.decode(latents / cfg.scaling_factor + cfg.shift_factor).sample.clamp(-1, 1)
    assert torch.allclose(latents, (mean - cfg.shift_factor) * cfg.scaling_factor, atol=1e-6)
    assert torch.allclose(family.decode_latents(latents), decoded, atol=1e-6)
    assert family.pixel_multiple == 16


def test_context_pickles_and_moves(family):
    context = family.student_context(list(CAPTIONS[:1]))
    back = pickle.loads(pickle.dumps(context)).to("cpu")
    assert torch.equal(back.features[0], context.features[0])
    assert back.to(dtype=torch.bfloat16).features[0].dtype == torch.bfloat16


def test_lora_targets_match_every_block(family):
    model = copy.deepcopy(family.transformer)
    model.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=LORA_TARGETS))
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in model.named_modules() if name.endswith("lora_A")}
    blocks = [f"{group}.{i}" for group in ("noise_refiner", "context_refiner", "layers")
              for i in range(len(getattr(model, group)))]
    assert adapted == {f"{block}.{target}" for block in blocks for target in LORA_TARGETS}


def test_bad_images_are_rejected_with_the_reason(family):
    with pytest.raises(ValueError, match="width 40 is not a multiple of 16"):
        family.check_images(torch.zeros(1, 3, 32, 40))
    with pytest.raises(ValueError, match="height 24 is not a multiple of 16"):
        family.teacher_context(["x"], torch.zeros(1, 3, 24, 32))
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        family.check_images(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="\\(B, 3, H, W\\)"):
        family.check_images(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="\\[-1, 1\\]"):
        family.encode_images(torch.full((1, 3, 32, 32), 2.0))
    family.check_images(torch.zeros(1, 3, 32, 48))


def test_too_long_contexts_are_an_error_not_an_index_crash(family):
    limit = family.transformer.config.axes_lens[0]
    with pytest.raises(ValueError, match="RoPE axis 0"):
        family._check_caption_lengths([torch.zeros(limit, 16)])
