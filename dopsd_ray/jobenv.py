"""Where a driver runs: the Ray it joins or starts, and whether it is a `ray job submit` job.

    init_ray(**kwargs)     ray.init, with every worker of the job told which cluster it is in
    wants_local_ray()      no cluster named (RAY_ADDRESS unset or "local")
    in_ray_job()           this process is a `ray job submit` entrypoint
    output_dir(path)       train.output_dir made absolute: the one place it is resolved
"""

import os
from pathlib import Path

import ray
from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR
from ray._private.services import canonicalize_bootstrap_address

from .storage import is_uri


def init_ray(**kwargs) -> None:
    """ray.init(**kwargs): a new local Ray, or the cluster that `address` or RAY_ADDRESS (or, with
    neither, the last `ray start` on this machine) names; with RAY_ADDRESS set for every worker
    of this job to the cluster they are in.

    Ray Train starts a detached PlacementGroupCleaner with every fit; each second it asks "the"
    cluster's state API whether the run's controller is alive, and removes the learners'
    placement group when it is not. It finds that cluster through RAY_ADDRESS, else through
    /tmp/ray/ray_current_cluster: the last `ray start` on the machine. Where that is another Ray
    (two clusters on one machine; a local Ray beside a `ray start` head), the controller is not
    found there and the cleaner removes a live run's placement group ("placement group was
    removed"). "local" (a Ray started here) makes it look for the machine's one Ray instead;
    where there are several it gives up and removes nothing.
    """
    address = kwargs.get("address") or os.environ.get("RAY_ADDRESS")
    runtime_env = dict(kwargs.pop("runtime_env", None) or {})
    if not (address or "").startswith("ray://"):  # a Ray Client's workers: the cluster's own env
        own = (None if address == "local" else canonicalize_bootstrap_address(address)) or "local"
        runtime_env["env_vars"] = {"RAY_ADDRESS": own, **runtime_env.get("env_vars", {})}
    ray.init(runtime_env=runtime_env, **kwargs)


def wants_local_ray() -> bool:
    """No cluster named: RAY_ADDRESS unset or "local" (the tests set it), for the jobs and
    benchmarks that then start a small local Ray of their own."""
    return os.environ.get("RAY_ADDRESS", "local") in ("", "local")


def in_ray_job() -> bool:
    """This process is the entrypoint of a `ray job submit` (Ray's job supervisor sets this for it)."""
    return RAY_JOB_CONFIG_JSON_ENV_VAR in os.environ


def output_dir(path: str) -> str:
    """train.output_dir made absolute (an object-store URI stays as it is). A relative path is
    taken from the current directory,
    except under `ray job submit`: there the current directory is the job's unpacked working
    dir, which Ray deletes, so it is taken from ~/dopsd-ray on the driver's node instead (and
    says so)."""
    if is_uri(path):
        return path.rstrip("/")
    out = Path(path).expanduser()
    if not out.is_absolute() and in_ray_job():
        out = (Path.home() / "dopsd-ray" / out).resolve()
        print(f"train.output_dir is relative, and Ray deletes a job's working dir: outputs go to {out} on this "
              "node (set an absolute train.output_dir on shared storage to choose)", flush=True)
    return str(out.resolve())
