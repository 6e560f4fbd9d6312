"""Shared test setup: every test session gets its own cache and runs directories, offline hub; the
prerequisites a test may need (the fused C++ scan kernel, Java) are markers that skip it, with the reason,
where the machine lacks them.

    @pytest.mark.requires_fused_scan    the fused CPU selective-scan kernel (dmclip/csrc), built by make install
                                        (a failure instead of a skip under DMCLIP_REQUIRE_FUSED_SCAN=1, as in make
                                        ci, where a compiler exists)
    @pytest.mark.requires_java          Java, for pycocoevalcap's PTB tokenizer and METEOR (caption metrics)

Parametrize over every backend and mark the one that needs the kernel,
``pytest.param("cpu", marks=pytest.mark.requires_fused_scan)``, rather than leaving it out of the list: a
case dropped from the list is never collected, so nobody sees that it did not run.
"""

from __future__ import annotations

import os
import shutil

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

FUSED_SCAN_MISSING = "fused CPU scan kernel not built: run make install"
JAVA_MISSING = ("caption metrics need Java (pycocoevalcap's PTB tokenizer and METEOR): "
                "apt-get install default-jre-headless, or make install as root")


def pytest_configure(config):
    config.addinivalue_line("markers", "requires_fused_scan: needs the fused C++ scan kernel; skipped with the "
                                       "reason where it did not build")
    config.addinivalue_line("markers", "requires_java: needs Java (caption metrics); skipped with the reason "
                                       "where `java` is not on PATH")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    # checked when a marked test is about to run, not at collection: a run of other tests never builds
    # or loads the kernel (a first build takes a minute)
    if item.get_closest_marker("requires_fused_scan") is not None:
        from dmclip.models import scan

        if "cpu" not in scan.available_backends():
            from dmclip.models.scan_build import compiler, extension_error

            reason = f"{FUSED_SCAN_MISSING} ({extension_error()})"
            if os.environ.get("DMCLIP_REQUIRE_FUSED_SCAN") and compiler() is not None:
                pytest.fail(f"{reason}; DMCLIP_REQUIRE_FUSED_SCAN is set (make ci) and a compiler exists")
            pytest.skip(reason)
    if item.get_closest_marker("requires_java") is not None and shutil.which("java") is None:
        pytest.skip(JAVA_MISSING)


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
    """One torch thread per test: the suite runs two workers on two cores, and more threads each would only make
    them fight. One thread never splits work, so it hides every bug of the split (rows a thread forgets, a
    partial sum added twice): tests/test_threads.py runs the code that splits work over threads (the scan
    kernels, the fused mixer and stack, a training step) at 1, 2, 3 and 4 threads, setting and restoring the
    count per case."""
    import torch

    torch.set_num_threads(1)
    yield


@pytest.fixture
def plot_pixels():
    """``plot_pixels(path, size=(w, h))`` -> ``{colour: pixel count}`` of a PNG plot, after checking that it
    decodes to ``size`` and is not blank. Count matplotlib's line colours ("C0", "C3", ...) to see that the
    data was drawn: a legend sample alone is a few dozen pixels, a drawn line hundreds."""
    import numpy as np
    from matplotlib.colors import to_rgb
    from PIL import Image

    def count(path, size: tuple[int, int], colours=("C0", "C1", "C2", "C3")) -> dict:
        with Image.open(path) as image:
            assert image.size == size, f"{path} is {image.size}, expected {size}"
            pixels = np.asarray(image.convert("RGB")).astype(int)
        assert (pixels.min(axis=-1) < 250).mean() > 0.01, f"{path} is blank"
        out = {}
        for colour in colours:
            rgb = np.array([round(255 * v) for v in to_rgb(colour)])
            out[colour] = int((np.abs(pixels - rgb).max(axis=-1) <= 8).sum())
        return out

    return count


# the sets the caption and CapFilt tests read: the tiny BLIP's vocabulary covers their captions
BLIP_CAPTION_SETS = ("world-noisy:size=24", "world-retrieval-a:size=12")


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    """An untrained BLIP of width 32 at 32 px whose tokenizer covers :data:`BLIP_CAPTION_SETS`, saved as a dmclip
    model (``run:<blip_dir>``); one per test module, so no module sees another's changes to it."""
    import torch

    from dmclip.data import build_dataset
    from dmclip.models.base import save_model
    from dmclip.models.blip import BlipModel, blip_tokenizer

    torch.manual_seed(0)
    captions = []
    for spec in BLIP_CAPTION_SETS:
        dataset = build_dataset(spec, image_size=32)
        captions += [c for i in range(len(dataset)) for c in dataset.captions(i)]
    model = BlipModel(image_size=32, patch_size=8, vision_width=32, vision_depth=1, vision_heads=2,
                      text_width=32, text_depth=1, text_heads=2, embed_dim=32, context_length=16,
                      tokenizer=blip_tokenizer(captions, 16), queue_size=32)
    return save_model(model, tmp_path_factory.mktemp("tiny-blip") / "model")
