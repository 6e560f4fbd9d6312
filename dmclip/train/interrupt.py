"""Ctrl-C and SIGTERM during training: stop at once, except while the weights are being updated."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any


class InterruptGuard:
    """Routes SIGINT/SIGTERM: raises KeyboardInterrupt at once, except inside ``deferred()`` (the weight
    update), where the signal is held until the block ends, so a checkpoint never holds half an update."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.deferring = False
        self.pending: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> InterruptGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                with contextlib.suppress(ValueError, OSError):
                    self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(sig, handler)
        self.previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.deferring:
            self.pending = signum
            return
        self._forward(signum, frame)

    def _forward(self, signum: int, frame) -> None:
        previous = self.previous.get(signum)
        if callable(previous):
            previous(signum, frame)  # Python's SIGINT handler / RunDir's SIGTERM handler raise KeyboardInterrupt
            if signum == signal.SIGTERM:  # a handler that did not raise: still stop like Ctrl-C
                raise KeyboardInterrupt
            return
        if previous == signal.SIG_IGN:
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        if self.pending is not None:
            signum, self.pending = self.pending, None
            self._forward(signum, None)
