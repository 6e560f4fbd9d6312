"""The mutation score per module, as a markdown table (tests/MUTANTS.md), from `mutmut results --all true`:

    mutmut results --all true | python scripts/mutation_score.py dmclip.coerce dmclip.config

A module's row counts its mutants by status; modules named on the command line come first, in that order,
then any other module with a checked mutant. Survivors are listed below the table, one per line, for
`mutmut show NAME`.
"""

from __future__ import annotations

import re
import sys
from collections import Counter

COLUMNS = ("killed", "survived", "timeout", "no tests", "suspicious")
# mutmut names a mutant <module>.x_<function>__mutmut_<n>, or <module>.xǁ<Class>ǁ<method>__mutmut_<n>
_NAME = re.compile(r"^\s*(?P<name>(?P<module>[\w.]+?)\.x[_ǁ]\S+__mutmut_\d+): (?P<status>.+?)\s*$")


def tally(lines) -> tuple[dict[str, Counter], list[str]]:
    """(status counts per module, names of the survivors) from the lines mutmut prints."""
    counts: dict[str, Counter] = {}
    survivors = []
    for line in lines:
        match = _NAME.match(line)
        if not match or match["status"] == "not checked":
            continue
        counts.setdefault(match["module"], Counter())[match["status"]] += 1
        if match["status"] == "survived":
            survivors.append(match["name"])
    return counts, survivors


def table(counts: dict[str, Counter], order: list[str]) -> list[str]:
    modules = [m for m in order if m in counts] + sorted(set(counts) - set(order))
    rows = ["| module | " + " | ".join(COLUMNS) + " | other | total |",
            "|---" * (len(COLUMNS) + 3) + "|"]
    for module in modules:
        count = counts[module]
        other = sum(count.values()) - sum(count[c] for c in COLUMNS)
        cells = [str(count[c]) for c in COLUMNS] + [str(other), str(sum(count.values()))]
        rows.append(f"| {module} | " + " | ".join(cells) + " |")
    return rows


def main(argv: list[str]) -> int:
    counts, survivors = tally(sys.stdin)
    if not counts:
        print("no checked mutants: run `make mutate` first", file=sys.stderr)
        return 1
    print("\n".join(table(counts, argv)))
    wanted = [s for s in survivors if not argv or any(s.startswith(m + ".") for m in argv)]
    if wanted:
        print("\nsurvivors (`mutmut show NAME` prints the change):")
        print("\n".join(wanted))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
