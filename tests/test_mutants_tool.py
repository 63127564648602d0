"""tools/mutants.py's own machinery (not the suite runs): exact-once patterns, the tree copy, the summary."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mutants():
    spec = importlib.util.spec_from_file_location("mutants_tool", REPO / "tools" / "mutants.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_every_listed_mutant_applies_to_the_current_code_and_names_existing_killers(mutants):
    names = [m.name for m in mutants.MUTANTS]
    assert len(names) == len(set(names))
    for mutant in mutants.MUTANTS:
        mutants.check_applies(mutant, REPO)
        assert mutant.breaks and mutant.edits
        for killer in mutant.killers:
            assert (REPO / killer.split("::")[0]).is_file(), killer
            assert "tests/" in killer
        assert all(e.pattern != e.replacement for e in mutant.edits)


def test_pattern_must_occur_exactly_once(mutants, tmp_path):
    (tmp_path / "m.py").write_text("x = 1\ny = 2\ny = 2\n")
    once = mutants.Mutant("once", (mutants.Edit("m.py", "x = 1", "x = 3"),), "x", ("tests/t.py",))
    twice = mutants.Mutant("twice", (mutants.Edit("m.py", "y = 2", "y = 0"),), "y", ("tests/t.py",))
    gone = mutants.Mutant("gone", (mutants.Edit("m.py", "z = 9", "z = 0"),), "z", ("tests/t.py",))
    missing_file = mutants.Mutant("nofile", (mutants.Edit("n.py", "x", "y"),), "-", ("tests/t.py",))
    for bad, count in ((twice, 2), (gone, 0), (missing_file, 0)):
        with pytest.raises(mutants.MutantError, match=f"occurs {count} times"):
            mutants.apply_mutant(bad, tmp_path)
    assert (tmp_path / "m.py").read_text() == "x = 1\ny = 2\ny = 2\n"  # nothing applied on failure
    mutants.apply_mutant(once, tmp_path)
    assert (tmp_path / "m.py").read_text() == "x = 3\ny = 2\ny = 2\n"


def test_copy_holds_the_tracked_files_and_a_mutant_changes_only_the_copy(mutants, tmp_path):
    mutant = next(m for m in mutants.MUTANTS if m.name == "score_importance_only")
    mutants.copy_tree(REPO, tmp_path)
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == sorted(
        p for p in tracked if (REPO / p).is_file())
    mutants.apply_mutant(mutant, tmp_path)
    edit = mutant.edits[0]
    assert edit.replacement in (tmp_path / edit.path).read_text()
    assert edit.pattern in (REPO / edit.path).read_text()
    assert mutants.imported_from(tmp_path, sys.executable).is_relative_to(tmp_path.resolve())


def test_summary_table_and_failure_parsing(mutants):
    results = [mutants.Result("a", "killed", "tests/test_x.py::test_y", 12.4),
               mutants.Result("b", "SURVIVED", "", 300.0)]
    text = mutants.summary(results)
    assert "| a | killed | tests/test_x.py::test_y | 12 |" in text
    assert "| b | SURVIVED | - | 300 |" in text
    assert text.splitlines()[-1] == "1 of 2 killed; not killed: b"
    output = "....F\n=== short test summary info ===\nFAILED tests/test_x.py::test_y[1] - AssertionError\n"
    assert mutants.first_failure(output) == "tests/test_x.py::test_y[1]"
    assert mutants.first_failure("5 passed") == ""
    with pytest.raises(mutants.MutantError, match="unknown mutant"):
        mutants.select(["no_such_mutant"])
    assert [m.name for m in mutants.select(["scale_plain_alpha"])] == ["scale_plain_alpha"]
