"""The FLUX.2-klein family against the stock diffusers pipeline, on a tiny random model."""

import copy
import inspect
import pickle

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu
from peft import LoraConfig
from PIL import Image

from dopsd_ray.algorithms.sampling import euler_sample
from dopsd_ray.algorithms.schedules import sample_sft_sigmas
from dopsd_ray.families.flux2_klein import (
    DEFAULT_INSTRUCTION, LORA_TARGETS, VARIANTS, Flux2Context, Flux2KleinFamily, build_tiny_flux2_klein, unpatchify,
)

CAPTIONS = ("a red square", "a blue triangle on grass")
H, W = 32, 48  # not square, to catch height/width swaps
SEQ = 160  # the tiny tokenizer is byte-level: the caption + instruction needs ~130 tokens
TEACHER_SEQ = 96


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_flux2_klein(tmp_path_factory.mktemp("flux2_klein") / "tiny", seed=0)


@pytest.fixture(scope="module")
def family(tiny_dir):
    return Flux2KleinFamily.from_pretrained(tiny_dir, max_sequence_length=SEQ)


@pytest.fixture(scope="module")
def stock(tiny_dir):
    pipe = Flux2KleinPipeline.from_pretrained(tiny_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(seed: int, batch: int = 2, height: int = H, width: int = W) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def sample(family, context, noise, steps=4):
    sigmas = family.inference_sigmas(steps, noise.shape[2] * 16, noise.shape[3] * 16)
    return euler_sample(lambda x, s: family.velocity(family.transformer, x, s, context), noise, sigmas)


def vae_latents(family, latents):
    """Our normalised patchified latents -> the pipeline's output_type="latent" layout."""
    mean, std = family._bn_stats(latents.device, latents.dtype)
    return unpatchify(latents * std + mean)


# -- parity with the stock pipeline ----------------------------------------------------


def test_few_step_sample_matches_stock_pipeline(family, stock):
    noise = torch.randn(family.latent_shape(2, H, W), generator=torch.Generator().manual_seed(0))
    assert noise.shape == (2, 128, H // 16, W // 16)  # the layout the pipeline's latents= takes
    latents = sample(family, family.student_context(list(CAPTIONS)), noise)
    ours = family.decode_latents(latents)

    # prompt= by name: the pipeline's first positional argument is the reference image
    kwargs = dict(prompt=list(CAPTIONS), height=H, width=W, num_inference_steps=4, guidance_scale=1.0,
                  max_sequence_length=SEQ)
    expected = stock(latents=noise.clone(), output_type="pt", **kwargs).images * 2 - 1  # [0, 1] -> [-1, 1]
    assert ours.shape == expected.shape == (2, 3, H, W)
    assert 0.05 < ours.std() and (ours.abs() < 0.999).float().mean() > 0.9  # not a saturated, trivial image
    assert (ours - expected).abs().max().item() <= 1e-5
    assert torch.allclose(family.inference_sigmas(4, H, W), stock.scheduler.sigmas, atol=0, rtol=0)

    expected_latents = stock(latents=noise.clone(), output_type="latent", **kwargs).images
    assert (vae_latents(family, latents) - expected_latents).abs().max().item() <= 1e-5


def test_student_context_is_the_pipeline_prompt_encoding(family, stock):
    context = family.student_context(list(CAPTIONS))
    embeds, ids = stock.encode_prompt(list(CAPTIONS), max_sequence_length=SEQ)
    assert context.prompt_embeds.shape == (2, SEQ, 3 * 16) and context.reference is None
    assert torch.equal(context.prompt_embeds, embeds) and torch.equal(context.text_ids, ids)
    assert list(inspect.signature(family.student_context).parameters) == ["captions"]  # no image input


def test_reference_teacher_sample_matches_pipeline_with_reference_image(family, stock):
    """The reference context is the pipeline's own image-conditioned (edit) path with the instruction."""
    h, w = 64, 80  # the pipeline refuses reference images under 64 px
    pixels = torch.randint(0, 256, (h, w, 3), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    image = pixels.permute(2, 0, 1)[None].float() / 255 * 2 - 1
    noise = torch.randn(family.latent_shape(1, h, w), generator=torch.Generator().manual_seed(1))
    latents = sample(family, family.teacher_context([CAPTIONS[0]], image), noise)
    expected = stock(image=Image.fromarray(pixels.numpy()), prompt=family.teacher_caption(CAPTIONS[0]),
                     latents=noise.clone(), height=h, width=w, num_inference_steps=4, guidance_scale=1.0,
                     output_type="latent", max_sequence_length=SEQ).images
    assert (vae_latents(family, latents) - expected).abs().max().item() <= 1e-5


def test_reference_teacher_context_depends_on_the_image(family):
    assert family.teacher_caption("a cat. ") == "a cat. " + DEFAULT_INSTRUCTION
    first, second = family.teacher_context(list(CAPTIONS), images(1)), family.teacher_context(list(CAPTIONS), images(2))
    assert first.reference.shape == family.latent_shape(2, H, W)
    assert torch.equal(first.prompt_embeds, second.prompt_embeds)  # same captions
    assert not torch.allclose(first.reference, second.reference)
    assert torch.equal(first.reference, family.encode_images(images(1)))  # posterior mode: deterministic

    student = family.student_context(list(CAPTIONS))
    assert not torch.allclose(first.prompt_embeds, student.prompt_embeds)  # the instruction is appended
    x = torch.randn(family.latent_shape(2, H, W), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        v1, v2, vs = (family.velocity(family.transformer, x, torch.tensor(0.75), c) for c in (first, second, student))
    assert v1.shape == x.shape and v1.dtype == torch.float32
    assert (v1 - v2).abs().max() > 1e-4 and (v1 - vs).abs().max() > 1e-4


def test_context_pickles_and_moves(family):
    context = family.teacher_context(list(CAPTIONS), images(1))
    back = pickle.loads(pickle.dumps(context.to("cpu")))
    assert isinstance(back, Flux2Context) and len(back) == 2
    assert torch.equal(back.reference, context.reference) and back.text_ids.dtype == torch.int64
    assert context.to(dtype=torch.bfloat16).prompt_embeds.dtype == torch.bfloat16
    assert context.to(dtype=torch.bfloat16).text_ids.dtype == torch.int64


# -- latents, schedules, pipeline --------------------------------------------------------


def test_encode_decode_shapes(family):
    latents = family.encode_images(images(4))
    assert latents.shape == family.latent_shape(2, H, W) and latents.dtype == torch.float32
    decoded = family.decode_latents(latents)
    assert decoded.shape == (2, 3, H, W) and decoded.abs().max() <= 1
    assert family.pixel_multiple == 16


def test_schedules(family):
    sigmas = family.inference_sigmas(4, H, W)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (5,) and sigmas[0] == 1 and sigmas[-1] == 0
    assert torch.all(sigmas[1:] < sigmas[:-1])
    # resolution-dependent: more image tokens shift the schedule toward noise
    assert torch.all(family.inference_sigmas(4, 1024, 1024)[1:-1] > family.inference_sigmas(4, 256, 256)[1:-1])
    uniform = torch.linspace(1, 1 / 4, 4)
    for h, w in ((H, W), (512, 768)):
        assert torch.allclose(family.shift_sigmas(uniform, h, w, 4), family.inference_sigmas(4, h, w)[:-1], atol=1e-6)
    assert torch.all(family.shift_sigmas(torch.tensor([0.5]), H, W, 4) > 0.5)


@pytest.mark.parametrize("side", [32, 1024, 1152])
def test_sft_sigmas_take_the_stock_schedulers_shift_for_the_runs_step_count(family, side):
    """klein's mu, compute_empirical_mu(image tokens, steps), depends on the number of steps
    up to 4300 image tokens (1024 x 1024 has 4096), not above (1152 x 1152 has 5184): SFT's
    sampled sigmas are the stock scheduler's shift of the logit-normal draws for the step
    count given, algorithm.inference_steps."""
    drawn = {}
    for steps in (4, 8):
        got = sample_sft_sigmas(family, 64, side, side, steps, torch.Generator().manual_seed(0))
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(family.scheduler.config)
        u = torch.sigmoid(torch.randn(64, generator=torch.Generator().manual_seed(0)))
        scheduler.set_timesteps(sigmas=u.numpy(), mu=compute_empirical_mu((side // 16) ** 2, steps))
        torch.testing.assert_close(got, scheduler.sigmas[:-1].float())
        drawn[steps] = got
    assert torch.equal(drawn[4], drawn[8]) == ((side // 16) ** 2 > 4300)


def test_pipeline_is_stock_over_the_family_components(family):
    pipe = family.pipeline()
    assert type(pipe) is Flux2KleinPipeline and pipe.config.is_distilled
    assert pipe.transformer is family.transformer and pipe.text_encoder is family.text_encoder
    assert pipe.scheduler is not family.scheduler  # its set_timesteps must not touch ours
    other = copy.deepcopy(family.transformer)
    assert family.pipeline(other).transformer is other


def test_lora_targets_cover_every_projection(family):
    transformer = copy.deepcopy(family.transformer)
    transformer.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=LORA_TARGETS), adapter_name="student")
    wrapped = {name for name, module in transformer.named_modules() if hasattr(module, "lora_A")}
    expected = {
        f"{block}.{i}.{proj}"
        for block, n, projs in (
            ("transformer_blocks", len(transformer.transformer_blocks),
             ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
              "attn.add_v_proj", "attn.to_add_out", "ff.linear_in", "ff.linear_out", "ff_context.linear_in",
              "ff_context.linear_out"]),
            ("single_transformer_blocks", len(transformer.single_transformer_blocks),
             ["attn.to_qkv_mlp_proj", "attn.to_out"]),
        )
        for i in range(n) for proj in projs
    }
    assert wrapped == expected
    with pytest.raises(ValueError, match="not supported"):  # why the single blocks' to_out is named per block
        copy.deepcopy(family.transformer).add_adapter(LoraConfig(r=2, target_modules=["attn.to_out"]))


def test_variants_name_the_released_checkpoints():
    assert VARIANTS["4b"].hub_id == "black-forest-labs/FLUX.2-klein-4B"
    assert VARIANTS["9b"].hub_id == "black-forest-labs/FLUX.2-klein-9B"
    assert (VARIANTS["4b"].num_layers, VARIANTS["4b"].num_single_layers) == (5, 20)
    assert (VARIANTS["9b"].num_layers, VARIANTS["9b"].num_single_layers) == (8, 24)


# -- clear errors --------------------------------------------------------------------------


def test_mixed_resolutions_in_a_batch_are_refused(family):
    batch = [images(0, 1)[0], images(1, 1, height=48)[0]]
    with pytest.raises(ValueError, match="one resolution.*item 1 is 48x48"):
        family.check_images(batch)
    with pytest.raises(ValueError, match="one resolution"):
        family.teacher_context(list(CAPTIONS), batch)
    family.check_images([images(0, 1)[0], images(1, 1)[0]])  # same size: fine


@pytest.mark.parametrize("shape, message", [
    ((1, 3, 40, 48), "height 40 is not a multiple of 16"),
    ((1, 3, 32, 56), "width 56 is not a multiple of 16"),
    ((1, 4, 32, 48), "3 \\(RGB\\) channels.*got 4"),
    ((3, 32, 48), "\\(B, 3, H, W\\)"),
])
def test_bad_images_are_refused(family, shape, message):
    with pytest.raises(ValueError, match=message):
        family.check_images(torch.zeros(shape))


def test_values_outside_the_range_are_refused(family):
    with pytest.raises(ValueError, match="\\[-1, 1\\]"):
        family.teacher_context(["x"], torch.full((1, 3, H, W), 2.0))


def test_context_batch_must_match_latents(family):
    context = family.student_context(list(CAPTIONS))
    with pytest.raises(ValueError, match="2 items for a batch of 1"):
        family.velocity(family.transformer, torch.zeros(family.latent_shape(1, H, W)), 0.5, context)


# -- the VLM teacher context ---------------------------------------------------------------


def test_vlm_teacher_context(tiny_dir, family):
    vlm_family = Flux2KleinFamily.from_pretrained(
        tiny_dir, teacher_context="vlm", max_sequence_length=SEQ, teacher_max_sequence_length=TEACHER_SEQ,
        vlm_min_pixels=32 * 32, vlm_max_pixels=64 * 64)
    first = vlm_family.teacher_context(list(CAPTIONS), images(1))
    second = vlm_family.teacher_context(list(CAPTIONS), torch.flip(images(1), dims=[3]))
    assert first.reference is None
    assert first.prompt_embeds.shape == (2, TEACHER_SEQ, family.transformer.config.joint_attention_dim)
    assert first.text_ids.shape == (2, TEACHER_SEQ, 4)
    assert not torch.allclose(first.prompt_embeds, second.prompt_embeds)
    # the real tokens are exactly the VLM encoder's (padding-stripped) features at the out layers
    stripped = vlm_family.vlm.encode(list(CAPTIONS), images(1), hidden_state_layers=(9, 18, 27), max_length=TEACHER_SEQ)
    for row, features in zip(first.prompt_embeds, stripped):
        assert torch.allclose(row[: len(features)], features, atol=1e-6)

    x = torch.randn(family.latent_shape(2, H, W), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        v1 = vlm_family.velocity(vlm_family.transformer, x, torch.tensor(0.5), first)
        v2 = vlm_family.velocity(vlm_family.transformer, x, torch.tensor(0.5), second)
    assert v1.shape == x.shape and torch.isfinite(v1).all()
    assert (v1 - v2).abs().max() > 1e-5
