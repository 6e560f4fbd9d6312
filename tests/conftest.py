"""Shared test setup: every test session gets its own cache and runs directories, offline hub."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def _isolated_dirs(tmp_path_factory):
    """Generated datasets are cached per test session (not in ~/.cache); runs never land in ./runs."""
    cache = tmp_path_factory.mktemp("dmclip-cache")
    runs = tmp_path_factory.mktemp("dmclip-runs")
    old = {k: os.environ.get(k) for k in ("DMCLIP_CACHE", "DMCLIP_RUNS")}
    os.environ["DMCLIP_CACHE"] = os.environ.get("DMCLIP_TEST_CACHE", str(cache))
    os.environ["DMCLIP_RUNS"] = str(runs)
    yield
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def _torch_threads():
    """Tests run two workers on two cores: one thread each keeps them from fighting."""
    import torch

    torch.set_num_threads(1)
    yield
