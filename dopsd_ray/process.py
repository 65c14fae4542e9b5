"""What every process that holds a model does first: the learner ranks, the rollout workers,
the context fill and the evaluation task.

    cfg = begin(config)                       the config (re-validated from its dict), threads, seed
    family = load(cfg, model_path, device)    the family, reading cached contexts when there are some
    device()                                  the one device choice: this process's GPU, or the CPU
"""

import torch

from .config import Config


def device(gpu: "torch.device | None" = None) -> torch.device:
    """This process's GPU (`gpu`, e.g. the one Ray Train gave a learner rank; else the current
    one) when CUDA is there, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    gpu = torch.device(gpu if gpu is not None else "cuda")
    return gpu if gpu.index is not None else torch.device("cuda", torch.cuda.current_device())


def begin(config: "dict | Config") -> Config:
    """The config of this process (a dict crosses process boundaries), its torch threads and
    its seed: identical initial weights in every process that builds the same model."""
    cfg = config if isinstance(config, Config) else Config.model_validate(config)
    if cfg.runtime.torch_threads:
        torch.set_num_threads(cfg.runtime.torch_threads)
    torch.manual_seed(cfg.train.seed)
    return cfg


def load(cfg: Config, model_path: str, device: "torch.device | str", contexts=None,
         transformer_device: "torch.device | str | None" = None):
    """The family from `model_path`: encoders and VAE on `device`, the transformer on
    `transformer_device` (default `device`). With `contexts` (data.cache_contexts) contexts
    are read from the cache and the encoders leave the GPU. A model on an object store is
    copied to this node first."""
    from .families import load_family
    from .storage import local_copy

    family = load_family(cfg.model, local_copy(model_path), device=device, transformer_device=transformer_device)
    return family if contexts is None else contexts.wrap(family)  # a contexts.ContextCache
