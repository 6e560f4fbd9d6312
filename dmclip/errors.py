"""The one error type the library raises for anything a user can fix.

The CLI prints it as two lines (``error: ...`` / ``hint: ...``) and exits with code 2.
"""

from __future__ import annotations


class DmclipError(Exception):
    """A problem the user can fix: ``message`` names it, ``hint`` says how."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:  # one line, as the CLI prints it
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


def closest(word: str, candidates, n: int = 3) -> list[str]:
    """Close matches of ``word`` among ``candidates`` (for 'did you mean' hints)."""
    import difflib

    return difflib.get_close_matches(word, list(candidates), n=n, cutoff=0.5)


def did_you_mean(word: str, candidates) -> str:
    """A hint sentence naming the close matches, or listing what exists."""
    matches = closest(word, candidates)
    if matches:
        return "did you mean " + " or ".join(repr(m) for m in matches) + "?"
    candidates = sorted(candidates)
    shown = ", ".join(candidates[:12]) + (" ..." if len(candidates) > 12 else "")
    return f"choose one of: {shown}" if candidates else "nothing is registered under this kind"
