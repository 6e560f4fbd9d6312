"""What several test files share, in one place: ``from helpers.cli import TINY_CLIP`` (pytest puts tests/ on
the path, so this package imports as ``helpers``).

- :mod:`helpers.cli`: the tiny-CLIP ``--set`` list, ``main`` on one thread, a command's only run, stderr lines
- :mod:`helpers.torchrun`: 2-rank ``torchrun`` launches of ``dmclip`` (gloo, CPU) and the 1e-4 run comparison
- :mod:`helpers.kill_resume`: SIGKILL a real ``dmclip`` process at a chosen point, resume, compare bit for bit
- :mod:`helpers.toy`: a tiny CLIP-like training task for the engine (also a torchrun script)
"""
