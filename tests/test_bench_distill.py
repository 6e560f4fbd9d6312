"""`python -m benchmarks.bench_distill --profile`: the cached step's time, part by part, from the real code path."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_profile_clocks_every_part_of_the_real_cached_step(monkeypatch):
    """Each part's clock wraps what DistillTask.loss and the step really call: a part that the step stopped
    calling through it (a renamed store method, a crop done elsewhere) would read 0 here, and the docs'
    profile would silently lose it. The parts and the rest add up to the step."""
    monkeypatch.syspath_prepend(str(REPO))  # `benchmarks` is a top-level package beside `dmclip`
    monkeypatch.setenv("DMCLIP_BENCH_QUICK", "1")  # 2 timed steps
    import dmclip.data.reinforced as reinforced
    from benchmarks.bench_distill import PARTS, profile

    apply_boxes = reinforced.apply_boxes
    text = profile(steps=2)
    assert reinforced.apply_boxes is apply_boxes  # the crop's clock is taken off again
    rows = {cells[0]: cells[1:] for cells in ([cell.strip() for cell in line.strip("|").split(" | ")]
                                               for line in text.splitlines()
                                               if line.startswith("| ") and not line.startswith("| part"))}
    assert list(rows) == [*PARTS, "the rest (Python in DistillTask.loss, zero_grad)"]
    for part in PARTS:
        per_step, share = rows[part]
        assert per_step != "0 ns" and share != "0.0%", part
    shares = [float(cells[1].rstrip("%")) for cells in rows.values()]
    assert sum(shares) == pytest.approx(100.0, abs=0.1 * len(shares))
    assert "tokenising its 128 captions" in text
