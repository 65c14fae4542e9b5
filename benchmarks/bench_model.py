"""A bench-size Z-Image-shaped pipeline: the tiny pipeline with a bigger transformer.

The text encoder, VAE and teacher VLM stay tiny (build_tiny_zimage): on CPU the cost
that matters for D-OPSD vs SFT is the denoiser's forward/backward. The transformer keeps
Z-Image's layout (noise refiner, context refiner, main blocks, 3-axis RoPE) at a
chosen width and depth, with head_dim 64 by default (the real model: dim 3840, 30 heads
of 128, 30 layers, 2 refiner layers, ~6B parameters).

    path = build_bench_zimage("outputs/bench/zimage-d512-l4", dim=512, layers=4)
    family = ZImageFamily.from_pretrained(path, max_sequence_length=64, ...)

The directory loads with ZImageFamily.from_pretrained (and model.path=... in a config).
"""

import json
import os
from pathlib import Path

import torch
from diffusers import ZImageTransformer2DModel

from dopsd_ray.families.zimage import build_tiny_zimage

TEXT_HIDDEN = 16  # build_tiny_zimage's Qwen3 hidden size = the transformer's cap_feat_dim


def transformer_kwargs(dim: int, layers: int, refiner_layers: int = 1, head_dim: int = 64,
                       cap_feat_dim: int = TEXT_HIDDEN, axes_lens: tuple[int, int, int] = (256, 128, 128)) -> dict:
    """cap_feat_dim must equal the text encoder's hidden size (16 for build_tiny_zimage's;
    the real model: 2560, with axes_lens (1536, 512, 512))."""
    if dim % head_dim:
        raise ValueError(f"--dim {dim} must be a multiple of head_dim {head_dim}")
    if head_dim % 8:
        raise ValueError(f"head_dim {head_dim} must be a multiple of 8 (RoPE axes split 2:3:3)")
    axes = [head_dim // 4, head_dim * 3 // 8, head_dim * 3 // 8]  # Z-Image: [32, 48, 48] of 128
    heads = dim // head_dim
    return dict(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=dim, n_layers=layers,
        n_refiner_layers=refiner_layers, n_heads=heads, n_kv_heads=heads, cap_feat_dim=cap_feat_dim,
        axes_dims=axes, axes_lens=list(axes_lens),
    )


def make_transformer(dim: int, layers: int, refiner_layers: int = 1, seed: int = 0, **kwargs) -> ZImageTransformer2DModel:
    """kwargs: head_dim, cap_feat_dim, axes_lens (see transformer_kwargs)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        transformer = ZImageTransformer2DModel(**transformer_kwargs(dim, layers, refiner_layers, **kwargs))
        with torch.no_grad():  # diffusers may leave these uninitialised (torch.empty) -> NaN outputs
            transformer.x_pad_token.normal_(std=0.02)
            transformer.cap_pad_token.normal_(std=0.02)
    return transformer


def build_bench_zimage(path: str | Path, dim: int = 512, layers: int = 4, refiner_layers: int = 1,
                       seed: int = 0) -> Path:
    """Build once (reused when the directory already holds this size)."""
    path = Path(path)
    stamp = {"dim": dim, "layers": layers, "refiner_layers": refiner_layers, "seed": seed}
    marker = path / "bench_model.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return path
    build_tiny_zimage(path, seed=seed)
    make_transformer(dim, layers, refiner_layers, seed).save_pretrained(path / "transformer", safe_serialization=True)
    marker.write_text(json.dumps(stamp))
    return path


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def init_ray(log_to_driver: bool = False, **kwargs) -> None:
    """The cluster's Ray under `ray job submit` (RAY_ADDRESS set), else a local Ray with
    room for the benchmark's actors on a small machine."""
    from dopsd_ray.jobenv import init_ray as ray_init, wants_local_ray

    if not wants_local_ray():
        ray_init(log_to_driver=log_to_driver, **kwargs)
    else:
        ray_init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False,
                 log_to_driver=log_to_driver, **kwargs)


def write_result(result: dict, out: str | None, name: str) -> Path:
    """`result` as JSON at `out`, default benchmarks/results/<name>-<host>.json."""
    import socket

    path = Path(out) if out else Path(__file__).resolve().parent / "results" / f"{name}-{socket.gethostname()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {path}")
    return path


def _storage_key(t):
    s = t.untyped_storage()
    return (s.data_ptr(), s.nbytes())


def count_rank_memory(module, engine) -> dict:
    """Bytes this rank holds for parameters, fp32 master partitions and optimizer state."""
    seen = set()

    def add(tensors) -> int:
        total = 0
        for t in tensors:
            if t is None or not hasattr(t, "untyped_storage") or t.numel() == 0:
                continue
            key = _storage_key(t)
            if key in seen:
                continue
            seen.add(key)
            total += key[1]
        return total

    params = add(getattr(p, "ds_tensor", p) for p in module.parameters())
    opt = engine.optimizer
    fp32 = add(getattr(opt, "fp32_partitioned_groups_flat", []) or [])
    inner = getattr(opt, "optimizer", opt)
    state = add(v for s in inner.state.values() for v in s.values() if hasattr(v, "untyped_storage"))
    full = sum(int(getattr(p, "ds_numel", p.numel())) * p.element_size() for p in module.parameters())
    return {"params": params, "fp32_master": fp32, "optimizer": state, "total": params + fp32 + state,
            "full_model_bytes": full}
