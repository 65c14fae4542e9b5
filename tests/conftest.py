"""Shared fixtures: tiny random pipelines, built once per test session.

One torch thread per process: 2-core machines, with Ray workers beside the tests.

RAY_ADDRESS=local for the whole session: every Ray a test starts, in this process (ray.init,
driver.train, Ray Data) or in a subprocess it launches (which inherits the environment), is a
new local one, never a `ray start` cluster on this machine or a stale record of one
(/tmp/ray/ray_current_cluster). tests/test_job_submit.py names its own head explicitly.
"""

import os

import pytest
import torch

torch.set_num_threads(1)
os.environ["RAY_ADDRESS"] = "local"


@pytest.fixture(scope="session")
def tiny_zimage_dir(tmp_path_factory):
    """A tiny random ZImagePipeline directory (with its tiny teacher VLM under teacher_vlm/)."""
    from dopsd_ray.families.zimage import build_tiny_zimage

    return build_tiny_zimage(tmp_path_factory.mktemp("tiny_zimage"), seed=0)


@pytest.fixture(scope="module")
def local_ray():
    """The one small local Ray of a test module (4 logical CPUs), shut down after it.

    Every test that needs Ray in this process uses it: a new local instance, never a
    cluster that `ray start` (or another user of this machine) left running. A Ray some
    earlier module left up in this process is reused, and left to that module."""
    import ray

    from dopsd_ray.jobenv import init_ray

    started = not ray.is_initialized()
    if started:
        init_ray(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def deepspeed_world1():
    """A one-rank gloo default group in this process, for real DeepSpeed engines without Ray (the
    one a LocalContext learner makes, if it came first). One per session: DeepSpeed caches the
    groups it was initialised with, so a group torn down and made again would leave it holding
    the old one ("Group ... is not registered")."""
    from dopsd_ray.learner.context import one_rank_group

    one_rank_group(torch.device("cpu"))


@pytest.fixture(scope="module")
def ray_cluster():
    """A multi-node Ray on this machine (tests/cluster.py: a CPU-less head this process drives
    from, learner and rollout nodes added by each test), shut down after the module."""
    import ray
    from cluster import NodeCluster

    assert not ray.is_initialized(), "a module before this one left Ray running"
    cluster = NodeCluster()
    yield cluster
    cluster.shutdown()


class S3:
    """An S3-protocol server on loopback: `uri(key)` names an object in its bucket; `env` is what a
    process needs to reach it (a real cluster's nodes have it from their instance profile and
    AWS_ENDPOINT_URL, or no endpoint at all on AWS)."""

    def __init__(self, port: int, bucket: str):
        self.bucket = bucket
        self.env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

    def uri(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}".rstrip("/")


@pytest.fixture(scope="session")
def s3():
    """moto's S3 server as a process of its own, one bucket in it, and its endpoint and test
    credentials in this process's environment (so every Ray started afterwards has them)."""
    import socket
    import subprocess
    import sys
    import time

    import pyarrow.fs as pafs

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = S3(port, "dopsd-test")
    saved = {k: os.environ.get(k) for k in store.env}
    os.environ.update(store.env)
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, "the S3 server did not start"
            time.sleep(0.2)
    fs = pafs.S3FileSystem(endpoint_override=store.env["AWS_ENDPOINT_URL"], region="us-east-1",
                           allow_bucket_creation=True)
    fs.create_dir(store.bucket)
    yield store
    server.terminate()
    server.wait()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
