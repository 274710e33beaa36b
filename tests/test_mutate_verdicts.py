"""scripts/mutate_verdicts.py, which carries mutmut's verdicts from one run's tree to the next
through a committed file: what is saved comes back as .meta files mutmut loads, a .meta caught
mid-write keeps the verdicts saved before, and a tree's own .meta is never overwritten."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "mutate_verdicts.py"
SOURCE = "src/incrementer/ingest/sequence.py"


def run(*args: object) -> str:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


def write_meta(tree: Path, source: str, verdicts: dict[str, int | None]) -> Path:
    """A .meta as mutmut 3.8 writes it."""
    meta = tree / "mutants" / (source + ".meta")
    meta.parent.mkdir(parents=True, exist_ok=True)
    meta.write_text(
        json.dumps(
            {
                "exit_code_by_key": verdicts,
                "hash_by_function_name": {"x_take": "ab12"},
                "type_check_error_by_key": {},
                "durations_by_key": dict.fromkeys(verdicts, 1.5),
                "estimated_durations_by_key": dict.fromkeys(verdicts, 2.0),
            }
        )
    )
    return meta


def test_verdicts_saved_from_one_tree_are_restored_into_a_fresh_one(tmp_path: Path) -> None:
    first, fresh, saved = tmp_path / "first", tmp_path / "fresh", tmp_path / "verdicts.json"
    verdicts = {"m.x_take__mutmut_1": 1, "m.x_take__mutmut_2": 0, "m.x_take__mutmut_3": None}
    write_meta(first, SOURCE, verdicts)
    assert run("save", first, saved).strip() == f"{saved}: 2 verdicts of 1 files"
    run("restore", saved, fresh)
    restored = json.loads((fresh / "mutants" / (SOURCE + ".meta")).read_text())
    assert restored == {
        "exit_code_by_key": verdicts,
        "hash_by_function_name": {"x_take": "ab12"},
        "type_check_error_by_key": {},
        "durations_by_key": {},
        "estimated_durations_by_key": {},
    }


def test_a_meta_caught_mid_write_keeps_what_was_saved_before(tmp_path: Path) -> None:
    tree, saved = tmp_path / "tree", tmp_path / "verdicts.json"
    meta = write_meta(tree, SOURCE, {"m.x_take__mutmut_1": 1})
    run("save", tree, saved)
    meta.write_text('{"exit_code_by_key": {"m.x_take__mutmut_1": ')
    run("save", tree, saved)
    entry = json.loads(saved.read_text())[SOURCE]
    assert entry["exit_code_by_key"] == {"m.x_take__mutmut_1": 1}


def test_restore_leaves_a_tree_s_own_meta_alone(tmp_path: Path) -> None:
    old, tree, saved = tmp_path / "old", tmp_path / "tree", tmp_path / "verdicts.json"
    write_meta(old, SOURCE, {"m.x_take__mutmut_1": 0})
    run("save", old, saved)
    own = write_meta(tree, SOURCE, {"m.x_take__mutmut_1": 1})
    before = own.read_text()
    assert run("restore", saved, tree) == ""
    assert own.read_text() == before
