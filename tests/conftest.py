"""Shared fixtures: tiny random pipelines, built once per test session."""

import pytest


@pytest.fixture(scope="session")
def tiny_zimage_dir(tmp_path_factory):
    """A tiny random ZImagePipeline directory (with its tiny teacher VLM under teacher_vlm/)."""
    from dopsd_ray.families.zimage import build_tiny_zimage

    return build_tiny_zimage(tmp_path_factory.mktemp("tiny_zimage"), seed=0)
