"""The exported LoRA at its trained strength in every loader, for each family on a tiny model.

- diffusers' load_lora_weights (what jobs/sample.py uses) reproduces the trained student;
- a plain loader that knows nothing of alpha (W + B @ A, scale 1, from the safetensors
  tensors alone, as ComfyUI and kohya-style tools do without `.alpha` keys) gets the same model;
- the ComfyUI copy, applied the way ComfyUI applies it to its native model (fused q/k/v rows),
  holds the same weights under ComfyUI's native names.
"""

import json

import pytest
import torch
from safetensors import safe_open

from dopsd_ray.families import comfyui_keys, lora_targets, pipeline_class
from dopsd_ray.families.flux2_klein import Flux2KleinFamily, build_tiny_flux2_klein
from dopsd_ray.families.toy import ToyFamily, build_tiny_toy
from dopsd_ray.families.zimage import ZImageFamily
from dopsd_ray.weights import COMFYUI_FILE, LoraWeights, comfyui_lora

SIDE = 32
CAPTIONS = ["a red circle on a blue background"]


@pytest.fixture(scope="module")
def tiny_dirs(tiny_zimage_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_export")
    return {"zimage": tiny_zimage_dir, "flux2_klein": build_tiny_flux2_klein(root / "flux2"),
            "toy": build_tiny_toy(root / "toy")}


def load(name, path):
    if name == "zimage":
        return ZImageFamily.from_pretrained(path, max_sequence_length=64)
    if name == "flux2_klein":
        return Flux2KleinFamily.from_pretrained(path, max_sequence_length=64)
    return ToyFamily.from_pretrained(path)


def trained_lora(family, name, rank=4, alpha=8.0):
    """A student LoRA with non-zero A and B (gaussian init leaves B = 0)."""
    weights = LoraWeights(family.transformer, lora_targets(name), rank=rank, alpha=alpha)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in weights.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return weights


def velocity(family, model):
    """The model's velocity on a fixed noisy input with the student context."""
    x = torch.randn(family.latent_shape(1, SIDE, SIDE), generator=torch.Generator().manual_seed(0))
    return family.velocity(model, x, torch.tensor(0.75), family.student_context(CAPTIONS))


def tensors(file):
    with safe_open(str(file), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


@torch.no_grad()
def plain_merge(transformer, lora):
    """W += B @ A for every LoRA pair, scale 1: knows nothing of alpha or of diffusers."""
    modules = dict(transformer.named_modules())
    for key, down in lora.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key[:-len(".lora_A.weight")]
        up = lora[f"{name}.lora_B.weight"]
        weight = modules[name.split(".", 1)[1]].weight  # drop the file's "transformer." / "unet." prefix
        weight += (up.flatten(1) @ down.flatten(1)).view_as(weight)  # 1x1 convs (toy) as matrices
    return transformer


@pytest.mark.parametrize("name", ["zimage", "flux2_klein", "toy"])
def test_every_loader_gets_the_trained_student(name, tiny_dirs, tmp_path):
    family = load(name, tiny_dirs[name])
    weights = trained_lora(family, name)  # rank 4, alpha 8: the student runs its LoRA at scale 2
    student = velocity(family, weights.model)
    file = weights.export(tmp_path, pipeline_class(name), comfyui=comfyui_keys(name))
    lora, metadata = tensors(file)
    assert not [k for k in lora if k.endswith(".alpha")]
    stored = json.loads(metadata["lora_adapter_metadata"])  # keys prefixed "transformer." / "unet."
    assert [v for k, v in stored.items() if k.endswith("lora_alpha")] == [4]  # = r: diffusers' scale is 1

    if name == "toy":
        diffusers_model = load(name, tiny_dirs[name]).transformer
        diffusers_model.load_lora_adapter(str(file), prefix="unet")
        assert not (tmp_path / COMFYUI_FILE).exists()  # the toy UNet is no ComfyUI model
    else:
        pipe = type(family.pipeline()).from_pretrained(str(tiny_dirs[name]))
        pipe.load_lora_weights(str(tmp_path))
        diffusers_model = pipe.transformer
    # Same computation as in training, with the power-of-two scale moved into B: bit for bit.
    assert torch.equal(velocity(family, diffusers_model), student)

    plain = plain_merge(load(name, tiny_dirs[name]).transformer, lora)
    torch.testing.assert_close(velocity(family, plain), student, rtol=1e-5, atol=1e-6)


def test_a_scale_that_is_no_power_of_two_is_folded_too(tiny_dirs, tmp_path):
    family = load("zimage", tiny_dirs["zimage"])
    weights = trained_lora(family, "zimage", rank=4, alpha=6.0)
    student = velocity(family, weights.model)
    file = weights.export(tmp_path, pipeline_class("zimage"))
    plain = plain_merge(load("zimage", tiny_dirs["zimage"]).transformer, tensors(file)[0])
    torch.testing.assert_close(velocity(family, plain), student, rtol=1e-5, atol=1e-6)


# ComfyUI's native modules of the tiny models and the diffusers modules whose rows each one
# stacks, transcribed from ComfyUI's sources (README, "Loading the LoRA elsewhere"):
# comfy/ldm/lumina/model.py (NextDiT) and comfy/utils.py z_image_to_diffusers / flux_to_diffusers.
ZIMAGE_NATIVE = {
    f"{block}.{native}": [f"{block}.{m}" for m in ours]
    for block in ("layers.0", "layers.1", "noise_refiner.0", "context_refiner.0")
    for native, ours in (("attention.qkv", ["attention.to_q", "attention.to_k", "attention.to_v"]),
                         ("attention.out", ["attention.to_out.0"]), ("feed_forward.w1", ["feed_forward.w1"]),
                         ("feed_forward.w2", ["feed_forward.w2"]), ("feed_forward.w3", ["feed_forward.w3"]))
}
FLUX2_NATIVE = {
    **{f"double_blocks.0.{native}": [f"transformer_blocks.0.{m}" for m in ours] for native, ours in (
        ("img_attn.qkv", ["attn.to_q", "attn.to_k", "attn.to_v"]),
        ("txt_attn.qkv", ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]),
        ("img_attn.proj", ["attn.to_out.0"]), ("txt_attn.proj", ["attn.to_add_out"]),
        ("img_mlp.0", ["ff.linear_in"]), ("img_mlp.2", ["ff.linear_out"]),
        ("txt_mlp.0", ["ff_context.linear_in"]), ("txt_mlp.2", ["ff_context.linear_out"]))},
    **{f"single_blocks.{i}.{native}": [f"single_transformer_blocks.{i}.{m}"]
       for i in (0, 1) for native, m in (("linear1", "attn.to_qkv_mlp_proj"), ("linear2", "attn.to_out"))},
}


@pytest.mark.parametrize("name, native_modules", [("zimage", ZIMAGE_NATIVE), ("flux2_klein", FLUX2_NATIVE)])
@torch.no_grad()
def test_the_comfyui_file_holds_the_same_weights_under_native_names(name, native_modules, tiny_dirs, tmp_path):
    family = load(name, tiny_dirs[name])
    file = trained_lora(family, name).export(tmp_path, pipeline_class(name), comfyui=comfyui_keys(name))
    comfy, _ = tensors(tmp_path / COMFYUI_FILE)
    assert set(comfy) == {f"diffusion_model.{m}.lora_{ab}.weight" for m in native_modules for ab in "AB"}

    merged = plain_merge(load(name, tiny_dirs[name]).transformer, tensors(file)[0])
    base = dict(load(name, tiny_dirs[name]).transformer.named_modules())
    ours = dict(merged.named_modules())
    for native, parts in native_modules.items():
        # ComfyUI's model holds the parts' weights stacked by rows; it adds B @ A (no .alpha: scale 1)
        weight = torch.cat([base[p].weight for p in parts])
        weight += comfy[f"diffusion_model.{native}.lora_B.weight"] @ comfy[f"diffusion_model.{native}.lora_A.weight"]
        expected = torch.cat([ours[p].weight for p in parts])
        torch.testing.assert_close(weight, expected, rtol=1e-5, atol=1e-6, msg=native)


def test_a_lora_the_comfyui_map_does_not_cover_gets_the_diffusers_file_only(tiny_dirs, tmp_path):
    from dopsd_ray.families.zimage import COMFYUI_BLOCKS, COMFYUI_MODULES

    state = {"layers.0.attention.to_q.lora_A.weight": torch.ones(2, 4),
             "layers.0.attention.to_q.lora_B.weight": torch.ones(4, 2)}
    with pytest.raises(KeyError, match="fuses 3 LoRA modules"):  # only q of the fused qkv
        comfyui_lora(state, COMFYUI_BLOCKS, COMFYUI_MODULES)
    with pytest.raises(KeyError, match="'x_embedder' has no ComfyUI name"):
        comfyui_lora({"x_embedder.lora_A.weight": torch.ones(2, 4), "x_embedder.lora_B.weight": torch.ones(4, 2)},
                     COMFYUI_BLOCKS, COMFYUI_MODULES)
    family = load("zimage", tiny_dirs["zimage"])
    weights = LoraWeights(family.transformer, ["attention.to_q"], rank=2, alpha=2)
    with pytest.warns(UserWarning, match="no ComfyUI LoRA file"):
        file = weights.export(tmp_path, pipeline_class("zimage"), comfyui=comfyui_keys("zimage"))
    assert file.is_file() and not (tmp_path / COMFYUI_FILE).exists()
