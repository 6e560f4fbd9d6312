"""Build (or load from the cache) the fused CPU selective-scan extension.

``python -m dmclip.models.scan_build`` builds it ahead of time (``make install`` runs it) and prints one
line. At run time ``load_extension()`` loads it from the cache or builds it once; any failure (no
compiler, no ninja, a compile error) is logged in one line and returns None, so the caller falls back
to the pure-PyTorch scan: a missing compiler never crashes dmclip.

The cache lives in ``$DMCLIP_CACHE/ext`` (else ``~/.cache/dmclip/ext``), in a folder keyed by a hash of
the sources, the torch version and the compiler flags, so a new torch or an edited kernel rebuilds.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCE = CSRC / "torch_ops.cpp"  # includes selective_scan.cpp, which includes the headers beside it
_lock = threading.Lock()
_state: dict = {"tried": False, "module": None, "error": None}


def cache_root() -> Path:
    """Where a new build goes: $DMCLIP_CACHE/ext, else ~/.cache/dmclip/ext."""
    base = os.environ.get("DMCLIP_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "dmclip") / "ext"


def _search_roots() -> list[Path]:
    # a build from `make install` (in ~/.cache) is reused by sessions that point DMCLIP_CACHE elsewhere
    # (the test suite does), instead of compiling again for a minute
    roots = [cache_root(), Path.home() / ".cache" / "dmclip" / "ext"]
    return list(dict.fromkeys(roots))


def compile_flags() -> list[str]:
    """-O3 and OpenMP, nothing CPU-specific: the AVX-512 and AVX2 kernels are compiled inside
    `#pragma GCC target` regions of the source and picked at run time, so one build runs on any x86-64."""
    return ["-O3", "-fopenmp"]


def sources() -> list[Path]:
    """The extension's source and the files it includes (all of them key the build)."""
    return [SOURCE, *sorted(p for p in CSRC.iterdir() if p.suffix in (".cpp", ".h") and p != SOURCE)]


def build_key() -> str:
    digest = hashlib.sha256()
    for path in sources():
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    digest.update(torch.__version__.encode())
    digest.update(" ".join(compile_flags()).encode())
    digest.update(sys.version.split()[0].encode())
    return digest.hexdigest()[:12]


def build(verbose: bool = False):
    """Compile (or load from the cache) and return the extension module; raises on failure."""
    from torch.utils import cpp_extension

    key = build_key()
    name = f"dmclip_selective_scan_{key}"
    directory = cache_root() / f"selective_scan_{key}"
    for root in _search_roots():
        if (root / f"selective_scan_{key}" / f"{name}.so").is_file():
            directory = root / f"selective_scan_{key}"
            break
    directory.mkdir(parents=True, exist_ok=True)
    flags = compile_flags()
    return cpp_extension.load(
        name=name,
        sources=[str(SOURCE)],
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"],
        build_directory=str(directory),
        verbose=verbose,
    )


def load_extension():
    """The compiled module, or None (logged once) when it cannot be built here."""
    with _lock:
        if _state["tried"]:
            return _state["module"]
        _state["tried"] = True
        if os.environ.get("DMCLIP_NO_EXTENSION"):
            _state["error"] = "disabled by DMCLIP_NO_EXTENSION"
            return None
        try:
            _state["module"] = build()
        except Exception as exc:  # no compiler / ninja / headers: fall back, never crash
            message = describe_failure(exc)
            _state["error"] = message
            log.warning("fused CPU selective scan unavailable (%s: %s); using the pure-PyTorch scan",
                        type(exc).__name__, message)
        return _state["module"]


def describe_failure(exc: Exception) -> str:
    """One line: the compiler's first error if there is one, else the exception's text."""
    text = str(exc)
    errors = [line.strip() for line in text.splitlines() if "error" in line.lower() and "Error building" not in line]
    return " ".join((errors[0] if errors else text).split())[:300]


def extension_error() -> str | None:
    """Why the extension did not load (None if it did or was not tried yet)."""
    return _state["error"]


def main() -> int:
    import time

    start = time.perf_counter()
    try:
        module = build()
    except Exception as exc:
        print(f"fused CPU selective scan NOT built ({type(exc).__name__}: {describe_failure(exc)})")
        return 1
    print(f"fused CPU selective scan ready in {cache_root()} ({' '.join(compile_flags())}, "
          f"{time.perf_counter() - start:.1f} s; runs the {module.isa()} kernels on this CPU)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
