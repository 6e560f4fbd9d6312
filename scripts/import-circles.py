#!/usr/bin/env python3
"""Fails on any import circle inside the dmclip package, imports inside functions included (`make lint`).

    python scripts/import-circles.py [ROOT]    # ROOT: the folder holding dmclip/ (default: this checkout)

A circle is a direct import a -> b with a chain of imports leading from b back to a. Import-linter's layer
contracts only see circles that cross layers; this sees those inside a package too (a module that imports
another lazily, inside a function, is still in a circle: the two cannot be understood or moved apart).
Prints each circle once, with the line of each import in it, and exits 1; exits 0 when there is none.
"""

from __future__ import annotations

import sys
from pathlib import Path

PACKAGE = "dmclip"


def circles(graph) -> list[tuple[str, ...]]:
    """Each circle once, as the modules along it from its smallest name back to that module."""
    found = {}
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back is not None:
                loop = (importer, *back)  # importer -> imported -> ... -> importer
                start = loop.index(min(loop[:-1]))
                found.setdefault(frozenset(loop), loop[start:-1] + loop[:start + 1])
    return sorted(found.values())


def describe(graph, loop: tuple[str, ...]) -> str:
    steps = []
    for importer, imported in zip(loop, loop[1:]):
        lines = sorted(detail["line_number"] for detail in graph.get_import_details(importer=importer,
                                                                                   imported=imported))
        steps.append(f"  {importer} -> {imported} (l.{', '.join(map(str, lines))})")
    return "\n".join(steps)


def main(argv: list[str]) -> int:
    root = Path(argv[0]) if argv else Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root.resolve()))
    import grimp

    graph = grimp.build_graph(PACKAGE, cache_dir=None)
    found = circles(graph)
    for loop in found:
        print(f"import circle: {' -> '.join(loop)}\n{describe(graph, loop)}")
    if found:
        print(f"{len(found)} import circle(s) in {PACKAGE}: move what both sides need into the lower module "
              "or a new one", file=sys.stderr)
        return 1
    print(f"no import circle in {PACKAGE} ({len(graph.modules)} modules)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
