"""Per-micro-batch seeding and the RNG states a checkpoint keeps (the engine's exact resume rests on them).

Every random draw of a step comes from generators seeded by ``(seed, step, rank, micro-batch)``, so a
resumed run draws what an uninterrupted one would have; ``rng_state`` / ``set_rng_state`` restore the rest.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any

import numpy as np
import torch


def _mix_seed(seed: int, step: int, rank: int, micro: int, salt: int) -> int:
    # distinct, well-spread 63-bit seeds per (seed, step, rank, micro, salt); MT19937 decorrelates nearby seeds
    value = (int(seed) & 0xFFFFFFFF) * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9
    value += rank * 0x94D049BB133111EB + micro * 0x2545F4914F6CDD1D + salt * 0x632BE59BD9B4E019
    return value % (2**63 - 1)


def reseed(seed: int, step: int, rank: int = 0, micro: int = 0, salt: int = 0, *, host: bool = True,
           cuda: bool | None = None) -> None:
    """Seed torch (CPU, and the current GPU), python ``random`` and numpy for one micro-batch.

    ``host=False`` seeds torch only (the model side: dropout, sampling), which is all a forward pass draws
    from; the data side (augmentations) also gets python ``random`` and numpy.
    """
    value = _mix_seed(seed, step, rank, micro, salt)
    torch.default_generator.manual_seed(value)
    if cuda is None:
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        torch.cuda.manual_seed(value)
    if host:
        random.seed(value)
        np.random.seed(value % (2**32))


def rng_state() -> dict:
    """The RNG states as plain tensors / ints (loadable with ``weights_only=True``)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    version, internal, gauss = random.getstate()
    state["python"] = {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    python = state.get("python")
    if python is not None:
        random.setstate((python["version"], tuple(int(v) for v in python["state"].tolist()), python["gauss"]))
    numpy_state = state.get("numpy")
    if numpy_state is not None:
        np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype("uint32"), numpy_state["pos"],
                             numpy_state["has_gauss"], numpy_state["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):  # fewer GPUs than when it was saved
            torch.cuda.set_rng_state_all(state["cuda"])
