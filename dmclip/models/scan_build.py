"""Build (or load from the cache) the fused CPU selective-scan extension.

``python -m dmclip.models.scan_build`` builds it ahead of time (``make install`` runs it) and prints one
line: what was built, or why not and how to fix it. At run time ``load_extension()`` loads it from the
cache or builds it once; any failure (no compiler, no ninja, a compile error) is logged in one line and
returns None, so the caller falls back to the pure-PyTorch scan: a missing compiler never crashes dmclip.

It compiles on any 64-bit CPU with a C++ compiler (GCC or Clang): the AVX-512/AVX2 kernels only on x86-64,
the portable ones everywhere. OpenMP is used where the compiler takes ``-fopenmp`` with ``<omp.h>``; without
it, torch's OpenMP ``at::parallel_for`` runs the kernels on one thread (the build says so).

Environment: ``CXX`` (the compiler, default ``c++``, as torch's cpp_extension), ``DMCLIP_SCAN_NO_SIMD=1``
(compile the vector instruction sets out: the code a non-x86 CPU runs, checked on x86-64),
``DMCLIP_REQUIRE_FUSED_SCAN=1`` (where a compiler exists, a failed build is an error: ``make ci``),
``DMCLIP_NO_EXTENSION=1`` (never load it). The cache lives in ``$DMCLIP_CACHE/ext`` (else
``~/.cache/dmclip/ext``), in a folder keyed by a hash of the sources, torch and Python versions and the
compiler flags, so a new torch, an edited kernel or another variant builds anew.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCE = CSRC / "torch_ops.cpp"  # includes selective_scan.cpp, which includes the headers beside it
INSTALL_FIX = "install g++ (or clang), then run `python -m dmclip.models.scan_build`"
_lock = threading.Lock()
_state: dict = {"tried": False, "module": None, "error": None, "fix": None}
_openmp: dict[str, bool] = {}


class NoCompilerError(RuntimeError):
    """No C++ compiler to build the extension with."""


def cache_root() -> Path:
    """Where a new build goes: $DMCLIP_CACHE/ext, else ~/.cache/dmclip/ext."""
    base = os.environ.get("DMCLIP_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "dmclip") / "ext"


def _search_roots() -> list[Path]:
    # a build from `make install` (in ~/.cache) is reused by sessions that point DMCLIP_CACHE elsewhere
    # (the test suite does), instead of compiling again for a minute
    roots = [cache_root(), Path.home() / ".cache" / "dmclip" / "ext"]
    return list(dict.fromkeys(roots))


def compiler() -> str | None:
    """The C++ compiler torch's cpp_extension would run (``$CXX``, else ``c++``), or None where it is missing."""
    words = shlex.split(os.environ.get("CXX") or "c++")
    return shutil.which(words[0]) if words else None


def compiler_takes_openmp(command: str) -> bool:
    """Whether ``command -fopenmp`` (``command`` as ``$CXX`` is written, e.g. ``ccache g++``) preprocesses
    ``#include <omp.h>`` (Apple's clang, or a clang without libomp, does not). Asked once per process."""
    if command not in _openmp:
        try:
            probe = subprocess.run([*shlex.split(command), "-fopenmp", "-x", "c++", "-E", "-", "-o", os.devnull],
                                   input="#include <omp.h>\n", capture_output=True, text=True, timeout=60)
            _openmp[command] = probe.returncode == 0
        except (OSError, subprocess.SubprocessError):
            _openmp[command] = False
    return _openmp[command]


def no_simd() -> bool:
    """``DMCLIP_SCAN_NO_SIMD=1``: build only the portable kernels, as on a CPU other than x86-64."""
    return os.environ.get("DMCLIP_SCAN_NO_SIMD", "") not in ("", "0")


def compile_flags(openmp: bool | None = None) -> list[str]:
    """-O3, OpenMP where the compiler takes it, nothing CPU-specific: the AVX-512 and AVX2 kernels are compiled
    inside target regions of the source and picked at run time, so one build runs on any x86-64."""
    if openmp is None:
        openmp = compiler() is not None and compiler_takes_openmp(os.environ.get("CXX") or "c++")
    return ["-O3", *(["-fopenmp"] if openmp else []), *(["-DDMCLIP_SCAN_NO_SIMD=1"] if no_simd() else [])]


def sources() -> list[Path]:
    """The extension's source and the files it includes (all of them key the build)."""
    return [SOURCE, *sorted(p for p in CSRC.iterdir() if p.suffix in (".cpp", ".h") and p != SOURCE)]


def build_key(flags: list[str] | None = None) -> str:
    digest = hashlib.sha256()
    for path in sources():
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    digest.update(torch.__version__.encode())
    digest.update(" ".join(compile_flags() if flags is None else flags).encode())
    digest.update(sys.version.split()[0].encode())
    return digest.hexdigest()[:12]


def _cached(key: str) -> Path | None:
    for root in _search_roots():
        path = root / f"selective_scan_{key}" / f"dmclip_selective_scan_{key}.so"
        if path.is_file():
            return path
    return None


def _import(path: Path):
    # a finished build is imported as it is: running the build system again to load it would rebuild it
    # whenever this checkout's path differs from the one that built it
    name = path.stem
    spec = importlib.util.spec_from_file_location(name, path, loader=importlib.machinery.ExtensionFileLoader(
        name, str(path)))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(verbose: bool = False):
    """The extension module: from the cache when built, else compiled now; raises on failure.

    Without a compiler any cached build of these sources serves (with OpenMP preferred)."""
    from torch.utils import cpp_extension

    command = compiler()
    variants = [compile_flags()] if command else [compile_flags(openmp=True), compile_flags(openmp=False)]
    for flags in variants:
        path = _cached(build_key(flags))
        if path is not None:
            return _import(path)
    if command is None:
        raise NoCompilerError(f"no C++ compiler ({_compiler_name()} not found)")
    flags = variants[0]
    key = build_key(flags)
    directory = cache_root() / f"selective_scan_{key}"
    directory.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=f"dmclip_selective_scan_{key}",
        sources=[str(SOURCE)],
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"] if "-fopenmp" in flags else [],
        build_directory=str(directory),
        verbose=verbose,
    )


def _compiler_name() -> str:
    return f"CXX={os.environ['CXX']}" if os.environ.get("CXX") else "c++"


def load_extension():
    """The compiled module, or None (logged once) when it cannot be built here."""
    with _lock:
        if _state["tried"]:
            return _state["module"]
        _state["tried"] = True
        if os.environ.get("DMCLIP_NO_EXTENSION"):
            _state["error"], _state["fix"] = "disabled by DMCLIP_NO_EXTENSION", "unset DMCLIP_NO_EXTENSION"
            return None
        try:
            _state["module"] = build()
        except Exception as exc:  # no compiler / ninja / headers: fall back, never crash
            _state["error"], _state["fix"] = describe_failure(exc), failure_fix(exc)
            log.warning("fused CPU selective scan unavailable (%s); using the pure-PyTorch scan. Fix: %s",
                        _state["error"], _state["fix"])
        return _state["module"]


def describe_failure(exc: Exception) -> str:
    """One line: the compiler's first error if there is one, else the exception's text."""
    if isinstance(exc, NoCompilerError):
        return str(exc)
    text = str(exc)
    errors = [line.strip() for line in text.splitlines() if "error" in line.lower() and "Error building" not in line]
    return f"{type(exc).__name__}: " + " ".join((errors[0] if errors else text).split())[:300]


def failure_fix(exc: Exception) -> str:
    """What to do about a failed build, in one line."""
    if isinstance(exc, NoCompilerError):
        return INSTALL_FIX
    return "run `python -m dmclip.models.scan_build --verbose` to see the compiler's output"


def extension_error() -> str | None:
    """Why the extension did not load (None if it did or was not tried yet)."""
    return _state["error"]


def extension_fix() -> str | None:
    """How to get the extension where it did not load (None if it did or was not tried yet)."""
    return _state["fix"]


def threads_note(module) -> str:
    """How many threads the kernels use, in words."""
    if module.threaded():
        return f"up to {torch.get_num_threads()} threads (torch.set_num_threads / OMP_NUM_THREADS)"
    return ("one thread: built without OpenMP, and torch's OpenMP at::parallel_for then runs on the calling "
            "thread; install OpenMP for the compiler (libomp, libgomp) and rebuild")


def main(argv: list[str] | None = None) -> int:
    """Build and say what was built in one line. Exit 1 only for a failed build with a compiler present and
    DMCLIP_REQUIRE_FUSED_SCAN set; otherwise 0, the fallback said."""
    parser = argparse.ArgumentParser(prog="python -m dmclip.models.scan_build", description=__doc__.split("\n")[0])
    parser.add_argument("--verbose", action="store_true", help="show the compiler's commands and output")
    verbose = parser.parse_args(argv).verbose
    start = time.perf_counter()
    try:
        module = build(verbose=verbose)
    except Exception as exc:
        required = bool(os.environ.get("DMCLIP_REQUIRE_FUSED_SCAN")) and compiler() is not None
        print(f"{'error: ' if required else ''}fused CPU selective scan NOT built ({describe_failure(exc)}); "
              f"dmclip uses the slower pure-PyTorch scan. Fix: {failure_fix(exc)}")
        return 1 if required else 0
    print(f"fused CPU selective scan ready in {Path(module.__file__).parent} ({time.perf_counter() - start:.1f} s): "
          f"the {module.isa()} kernels on this CPU, {threads_note(module)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
