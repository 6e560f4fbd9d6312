"""What this install has, for ``dmclip doctor``: versions, the selective scan ``auto`` picks and why, threads,
Java, the optional extras, GPUs, Fashion-MNIST and the directories dmclip writes to.

:func:`gather` returns plain JSON-ready values; each thing that is missing comes with ``fix``, the step that
brings it.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import sys

import torch

from dmclip import __version__
from dmclip.data.fashion_mnist import FASHION_MNIST_DIR, fashion_mnist_available
from dmclip.models import scan, scan_build, scan_ext
from dmclip.runs import default_runs_root

EXTRAS = ("export", "dashboards", "cuda")  # the pip extras a user installs on purpose (not dev)


def gather() -> dict:
    """Every fact ``dmclip doctor`` shows, as one JSON-ready dict."""
    return {
        "versions": {"dmclip": __version__, "torch": torch.__version__, "python": platform.python_version(),
                     "platform": f"{platform.system()} {platform.machine()}", "executable": sys.executable},
        "scan": scan_facts(),
        "threads": thread_facts(),
        "java": java_facts(),
        "extras": extras(),
        "gpu": gpu_facts(),
        "fashion_mnist": {"present": fashion_mnist_available(), "path": FASHION_MNIST_DIR,
                          "fix": None if fashion_mnist_available() else "apt-get install dataset-fashion-mnist"},
        "directories": {"cache": str(scan_build.cache_root().parent), "runs": str(default_runs_root().resolve())},
    }


def scan_facts() -> dict:
    """The backend ``auto`` picks for CPU tensors (and CUDA ones where there is a GPU), with the reason."""
    backend = scan.resolve_backend("auto", torch.zeros(1, 1, 1))
    module = scan_ext.cpu_extension()
    facts = {"backend": backend, "kernel": None, "reason": None, "fix": None}
    if module is not None:
        facts["kernel"] = {"isa": module.isa(), "cpu_isas": list(module.supported_isas()),
                           "build_isas": list(module.compiled_isas()), "threaded": bool(module.threaded()),
                           "path": module.__file__}
    else:
        facts["reason"] = scan_build.extension_error()
        facts["fix"] = scan_build.extension_fix()
    if torch.cuda.is_available():
        facts["cuda_backend"] = "cuda" if scan_ext.cuda_scan_fn() is not None else "chunked"
    return facts


def thread_facts() -> dict:
    """torch's thread count and where it comes from, and how many of them the fused kernels can use."""
    backend = re.search(r"ATen parallel backend: (.+)", torch.__config__.parallel_info())
    module = scan_ext.cpu_extension()
    return {"torch": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "aten_parallel_backend": backend.group(1).strip() if backend else None,
            "kernel": scan_build.threads_note(module) if module is not None else None}


def java_facts() -> dict:
    """Java runs pycocoevalcap's tokenizer and METEOR (caption metrics)."""
    path = shutil.which("java")
    if path is None:
        return {"path": None, "version": None, "fix": "install a JRE, e.g. apt-get install default-jre-headless "
                                                      "(caption metrics need it)"}
    try:
        probe = subprocess.run([path, "-version"], capture_output=True, text=True, timeout=60)
        version = (probe.stderr or probe.stdout).strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        version = None
    return {"path": path, "version": version, "fix": None}


def extras() -> dict:
    """``{extra: {package: version or None}}`` for the pip extras of dmclip's metadata (None: not installed);
    empty where dmclip was not installed with pip."""
    try:
        requirements = importlib.metadata.requires("dmclip") or []
    except importlib.metadata.PackageNotFoundError:
        return {}
    found: dict[str, dict[str, str | None]] = {}
    for requirement in requirements:
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", requirement)
        if extra is None or extra.group(1) not in EXTRAS:
            continue
        name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)
        found.setdefault(extra.group(1), {})[name] = _version(name)
    return found


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def gpu_facts() -> dict:
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None)
    return {"cuda": cuda, "cuda_version": torch.version.cuda,
            "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
            "mps": bool(mps is not None and mps.is_available())}
