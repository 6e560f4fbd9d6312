"""`make bench`: speed and size figures measured in one run, written as one section to docs/benchmarks.md.

Each ``benchmarks/bench_<name>.py`` has ``main() -> list[dict]``; see :mod:`benchmarks.common` for the
row contract and the timing helpers, and :mod:`benchmarks.run_all` for the runner.
"""
