"""Checks that fail fast, before any actor or trainer starts, naming what to fix."""

import re
from pathlib import Path

import ray

from .config import Config, ConfigError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_paths(cfg: Config) -> None:
    path = cfg.model.path
    if path is not None and not Path(path).exists() and not HUB_ID.match(path):
        raise ConfigError(f"model.path={path!r}: no such directory, and not a hub id like 'Tongyi-MAI/Z-Image-Turbo'")
    if path is not None and Path(path).is_dir() and not (Path(path) / "model_index.json").is_file():
        raise ConfigError(f"model.path={path!r} is a directory without model_index.json: "
                          "point it at a diffusers pipeline folder (save_pretrained output)")
    data = cfg.data.path
    for p in ([data] if isinstance(data, str) else data or []):
        if not p.startswith(("s3://", "gs://", "http://", "https://")) and not Path(p).exists():
            raise ConfigError(f"data.path={p!r} does not exist; make shards with jobs/prepare_data.py")


def check_resources(cfg: Config) -> None:
    """Can the cluster place the learner group and the rollout workers at all?"""
    rt = cfg.runtime
    total = ray.cluster_resources()
    need: dict[str, float] = {}
    for res, n in ((rt.learner_resources, rt.num_learners),
                   (rt.rollout_resources, rt.num_rollout_workers if rt.mode == "disaggregated" else 0)):
        for k, v in res.items():
            need[k] = need.get(k, 0) + v * n
    # Ray Data decodes images in tasks of its own: leave it at least one CPU, or the stream starves
    need["CPU"] = need.get("CPU", 0) + 1
    for k, v in need.items():
        if total.get(k, 0) < v:
            raise ConfigError(
                f"runtime: the learners, rollout workers and the data stream need {v:g} {k} but the cluster has "
                f"{total.get(k, 0):g}; lower runtime.num_learners / runtime.num_rollout_workers or "
                "their *_resources, or add nodes")


def preflight(cfg: Config) -> None:
    check_paths(cfg)
    check_resources(cfg)
