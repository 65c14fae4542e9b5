"""Shared fixtures: tiny random pipelines, built once per test session.

One torch thread per process: 2-core machines, with Ray workers beside the tests.
"""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_zimage_dir(tmp_path_factory):
    """A tiny random ZImagePipeline directory (with its tiny teacher VLM under teacher_vlm/)."""
    from dopsd_ray.families.zimage import build_tiny_zimage

    return build_tiny_zimage(tmp_path_factory.mktemp("tiny_zimage"), seed=0)


@pytest.fixture(scope="module")
def local_ray():
    """A small local Ray for one test module's end-to-end runs."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
