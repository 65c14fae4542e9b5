"""The memory plan (dopsd_ray/plan.py): its exact parts against DeepSpeed's own partitions, the
printed plan of every shipped recipe, preflight's refusal, and the shipped model configs."""

from pathlib import Path

import pytest
import torch

from dopsd_ray.config import ConfigError
from dopsd_ray.recipes import load_config
from dopsd_ray.plan import CONFIG_DIR, build_meta, count, count_transformer, partition

ROOT = Path(__file__).resolve().parents[1]
REAL_RECIPES = sorted(p for p in (ROOT / "configs").glob("*.yaml") if p.stem not in ("tiny", "toy"))


def _tiny_transformer(path):
    from diffusers import ZImageTransformer2DModel

    return ZImageTransformer2DModel.from_pretrained(str(path), subfolder="transformer")


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_exact_parts_match_deepspeed_zero3(tiny_zimage_dir, deepspeed_world1, lora):
    """Trainable, teacher, frozen and optimizer-state counts are what DeepSpeed holds for the learner's weights."""
    import deepspeed

    from dopsd_ray.families import lora_targets
    from dopsd_ray.learner import deepspeed_config
    from dopsd_ray.weights import make_weights

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"lora.enabled={str(lora).lower()}", "runtime.zero_stage=3"])
    planned = count_transformer(cfg, _tiny_transformer(tiny_zimage_dir))

    # what learner.setup does
    weights = make_weights(_tiny_transformer(tiny_zimage_dir), cfg.lora, lora_targets("zimage"))
    frozen = weights.base_as_buffers()
    ds_config = deepspeed_config(cfg)
    if not frozen:
        deepspeed.zero.Init(module=weights.module, config_dict_or_path=ds_config)
    optimizer = torch.optim.AdamW(weights.trainable_parameters(), lr=1e-4)
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=weights.module, optimizer=optimizer, config=ds_config)

    assert planned["frozen"] == frozen == (planned["transformer"] if lora else 0)  # LoRA: the whole base, as buffers
    owned = list(weights.module.parameters())
    assert all(hasattr(p, "ds_tensor") for p in owned)  # DeepSpeed partitions exactly these
    assert sum(p.ds_numel for p in owned) == sum(planned["trainable"]) + sum(planned["teacher"])
    assert sum(p.ds_tensor.numel() for p in weights.trainable_parameters()) == partition(planned["trainable"], 1, True)
    assert sum(p.ds_tensor.numel() for p in weights.teacher_parameters()) == partition(planned["teacher"], 1, True)
    # the fp32 partition the optimizer steps (its AdamW moments are made alike, at the first step)
    assert sum(t.numel() for t in ds_optimizer.fp32_partitioned_groups_flat) == partition(planned["trainable"], 1, True)
    assert sum(planned["teacher"]) == sum(planned["trainable"])
    assert lora or sum(planned["trainable"]) == planned["transformer"]
    engine.destroy()


def test_partition_splits_each_parameter_at_zero3_and_the_flat_group_below():
    assert partition([10, 3], 4, per_parameter=True) == 3 + 1
    assert partition([10, 3], 4, per_parameter=False) == 4


@pytest.mark.parametrize("recipe", REAL_RECIPES, ids=lambda p: p.stem)
def test_plan_prints_every_row_for_every_shipped_recipe(recipe, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("plan_job", ROOT / "jobs" / "plan.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    rc = job.main(["--config", str(recipe), "--gpu-memory", "80"])
    out = capsys.readouterr().out
    cfg = load_config(recipe)
    rows = ["student", "teacher", "gradients", "optimizer state", "EMA fp32 shadow", "VAE",
            "activations ESTIMATE", "without gradient checkpointing" if cfg.model.gradient_checkpointing
            else "with gradient checkpointing", "total", "sync payload", "fits in 80 GiB"]
    rows += ["frozen base"] if cfg.lora.enabled else ["ZeRO-3 gathered block"]
    if cfg.data.cache_contexts:  # the encoders that make contexts leave the GPU
        rows += ["text encoder + VLM  " if cfg.model.teacher_context == "vlm" else "text encoder  ", "released"]
    else:
        rows += ["text encoder"] + (["teacher VLM"] if cfg.model.teacher_context == "vlm" else [])
    rows += ["rollout worker:"] if cfg.runtime.mode == "disaggregated" else []
    assert [r for r in rows if r not in out] == []
    if "_1gpu" in recipe.stem or "_8gpu" in recipe.stem:  # the single-machine recipes fit an 80 GB GPU
        assert rc == 0 and "per GPU: yes" in out


def test_preflight_refuses_a_recipe_that_cannot_fit_and_names_what_to_change():
    from dopsd_ray.preflight import check_memory

    cfg = load_config(ROOT / "configs" / "flux2_klein_9b_lora.yaml",
                      ["lora.enabled=false", "runtime.num_learners=1", "runtime.gpu_memory_gb=24"])
    with pytest.raises(ConfigError) as err:
        check_memory(cfg)
    msg = str(err.value)
    assert "per learner rank" in msg and "24 GiB" in msg
    for change in ("lora.enabled=true", "runtime.offload_optimizer=true", "runtime.num_learners=2"):
        assert change in msg
    check_memory(load_config(ROOT / "configs" / "zimage_turbo_lora_1gpu.yaml", ["runtime.gpu_memory_gb=80"]))


def test_activations_are_one_trained_states_whatever_k_and_the_algorithm():
    """The learner backpropagates each trained state as soon as it is scored: D-OPSD holds one
    state's activations, like SFT at the same batch, whatever K or states_per_rollout."""
    from dopsd_ray.plan import activation_bytes

    recipe = ROOT / "configs" / "zimage_turbo_lora_1gpu.yaml"
    c = count(load_config(recipe))
    for ckpt in (True, False):
        dopsd = activation_bytes(load_config(recipe), c, ckpt)
        assert activation_bytes(load_config(recipe, ["algorithm.name=sft"]), c, ckpt) == dopsd
        assert activation_bytes(load_config(recipe, ["algorithm.states_per_rollout=1"]), c, ckpt) == dopsd
        assert activation_bytes(load_config(recipe, ["algorithm.training_sigmas=inference",
                                                     "algorithm.inference_steps=8"]), c, ckpt) == dopsd
        assert activation_bytes(load_config(recipe, ["train.batch_size=2"]), c, ckpt) == 2 * dopsd


def test_more_learners_shrink_only_what_zero3_partitions():
    from dopsd_ray.plan import plan

    one = load_config(ROOT / "configs" / "zimage_turbo_lora_1gpu.yaml")
    eight = load_config(ROOT / "configs" / "zimage_turbo_lora_8gpu.yaml")
    c = count(one)
    rows1, rows8 = (dict((k, b) for k, b, _ in plan(cfg, c).rows["learner rank"]) for cfg in (one, eight))
    assert rows8["frozen base (buffers, whole)"] == rows1["frozen base (buffers, whole)"]
    assert rows8["optimizer state"] < rows1["optimizer state"] / 7


def test_shipped_model_configs_build_on_meta_with_their_key_shapes():
    """Every config under models/configs builds with the family's classes, and the components agree
    (caption features = text encoder hidden = teacher VLM hidden)."""
    from transformers import Qwen3VLForConditionalGeneration

    from dopsd_ray.families import flux2_klein, zimage
    from dopsd_ray.plan import _read

    def built(family, name):
        root = CONFIG_DIR / name
        return {k: build_meta(cls, _read(root / k)) for k, cls in family.COMPONENT_CLASSES.items()}

    vlm = {size: build_meta(Qwen3VLForConditionalGeneration, _read(CONFIG_DIR / f"Qwen--Qwen3-VL-{size}-Instruct"))
           for size in ("4B", "8B")}
    z = built(zimage, "Tongyi-MAI--Z-Image-Turbo")
    assert z["transformer"].layers[0].attention.to_q.weight.shape == (3840, 3840)
    assert z["transformer"].cap_embedder[1].weight.shape == (3840, z["text_encoder"].config.hidden_size)
    assert vlm["4B"].config.text_config.hidden_size == z["text_encoder"].config.hidden_size == 2560
    assert z["vae"].config.latent_channels == z["transformer"].config.in_channels == 16
    for name, width, vlm_size in (("4B", 3072, "4B"), ("9B", 4096, "8B")):
        k = built(flux2_klein, f"black-forest-labs--FLUX.2-klein-{name}")
        hidden = k["text_encoder"].config.hidden_size
        assert k["transformer"].context_embedder.weight.shape == (width, 3 * hidden)  # 3 stacked layers
        assert k["transformer"].x_embedder.weight.shape == (width, 4 * k["vae"].config.latent_channels)
        assert vlm[vlm_size].config.text_config.hidden_size == hidden
        assert all(p.is_meta for p in k["transformer"].parameters())
