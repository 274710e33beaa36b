"""Keep mutmut's verdicts in the repository, so that a mutation run longer than one sitting can
go on from where the last one stopped, on another machine.

mutmut keeps, per source file, `mutants/<file>.meta`: each mutant's exit code (its verdict) and
a hash of each function. When it generates the mutants again it keeps the verdict of every
mutant whose function hash is unchanged and runs the others. This script copies the verdicts and
hashes out of a working tree's `mutants/` into one JSON file (save), and writes them back as
.meta files where there are none (restore): durations are left out, mutmut measures them again.

    python3 scripts/mutate_verdicts.py save TREE FILE
    python3 scripts/mutate_verdicts.py restore FILE TREE
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SUFFIX = ".meta"


def save(tree: Path, out: Path) -> int:
    """FILE gets every .meta under TREE/mutants that reads as whole JSON (mutmut rewrites one
    after each verdict: a file caught mid-write keeps its previous entry in FILE)."""
    kept = json.loads(out.read_text()) if out.exists() else {}
    mutants = tree / "mutants"
    for meta in sorted(mutants.rglob("*" + SUFFIX)):
        try:
            data = json.loads(meta.read_text())
        except json.JSONDecodeError:
            continue
        kept[str(meta.relative_to(mutants))[: -len(SUFFIX)]] = {
            "hash_by_function_name": data.get("hash_by_function_name", {}),
            "exit_code_by_key": data["exit_code_by_key"],
        }
    out.write_text(json.dumps(kept, indent=1, sort_keys=True) + "\n")
    judged = sum(
        code is not None for entry in kept.values() for code in entry["exit_code_by_key"].values()
    )
    print(f"{out}: {judged} verdicts of {len(kept)} files")
    return 0


def restore(saved: Path, tree: Path) -> int:
    """A .meta for each file FILE knows and TREE/mutants does not have yet."""
    if not saved.exists():
        return 0
    restored = 0
    for source, entry in json.loads(saved.read_text()).items():
        meta = tree / "mutants" / (source + SUFFIX)
        if meta.exists():
            continue
        meta.parent.mkdir(parents=True, exist_ok=True)
        meta.write_text(
            json.dumps(
                {
                    "exit_code_by_key": entry["exit_code_by_key"],
                    "hash_by_function_name": entry["hash_by_function_name"],
                    "type_check_error_by_key": {},
                    "durations_by_key": {},
                    "estimated_durations_by_key": {},
                }
            )
        )
        restored += 1
    if restored:
        print(f"verdicts of {restored} files restored from {saved}")
    return 0


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "save":
        return save(Path(argv[1]), Path(argv[2]))
    if len(argv) == 3 and argv[0] == "restore":
        return restore(Path(argv[1]), Path(argv[2]))
    print("\n".join(__doc__.strip().splitlines()[-2:]), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
