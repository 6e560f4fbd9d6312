"""Atomic file writes and safe checkpoint loads: the leaf every layer that writes files uses.

A reader sees the old file or the new one, never half of one (a temporary file in the same directory, then
``os.replace``). ``torch_load`` reads checkpoints with ``weights_only=True`` and one-line errors.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from dmclip.errors import DmclipError

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are for everyone who can read the dir
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise DmclipError(f"could not write {path}: {exc.strerror or exc}",
                          "free disk space or choose another --runs-dir; the previous file is unchanged") from exc
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_npz(path: Path, arrays: dict) -> None:
    """``numpy.savez_compressed`` of ``arrays`` (name -> array), written atomically."""
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(jsonable(obj), indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj: Any, path: Path) -> None:
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def torch_load(path: Path, map_location="cpu") -> Any:
    """Load a checkpoint safely (``weights_only=True``) with one-line errors."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise DmclipError(f"checkpoint {path} does not exist", "check the run directory, or start without --resume")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DmclipError(f"checkpoint {path} cannot be read ({first[:160]})",
                          "it is truncated or not a dmclip checkpoint: use another one, or the previous "
                          "checkpoint in the same directory") from None


def jsonable(obj: Any) -> Any:
    """``obj`` with what JSON cannot hold made plain: numpy/torch scalars, paths, nan (null) and inf ("inf")."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        try:
            return jsonable(obj.item())
        except (ValueError, RuntimeError):
            pass
    if isinstance(obj, Path):
        return str(obj)
    return obj
