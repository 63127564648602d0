#!/usr/bin/env python
"""Hand-written mutants of the method's core rules: each must make the fast suite fail.

Every mutant is one or more exact text edits (file, pattern, replacement) and a line saying what it breaks.
For each, the script copies the tracked tree (``git ls-files``) to a temporary directory, applies the edits (a
pattern that does not occur exactly once is an error, so a mutant cannot rot silently), runs the mutant's named
killer tests with ``-x``, and only if they all pass the rest of the fast suite (``-m "not slow" -x``). It prints
one row per mutant (killed / SURVIVED, by which test, seconds) and exits non-zero if any survives.

    python tools/mutants.py            # every mutant
    python tools/mutants.py --list     # names and what each breaks
    python tools/mutants.py --only snapshot_never_refreshes --only scale_plain_alpha

Not part of CI (it is slow): run it before closing an issue that touches the method, and paste its table.
A new method brings its own mutants here.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
FAST = ("-m", "not slow")


@dataclasses.dataclass(frozen=True)
class Edit:
    """Replace ``pattern`` (which must occur exactly once) by ``replacement`` in ``path`` (repo-relative)."""

    path: str
    pattern: str
    replacement: str


@dataclasses.dataclass(frozen=True)
class Mutant:
    """A deliberate bug in a core rule, the tests expected to catch it first, and what it breaks."""

    name: str
    edits: tuple[Edit, ...]
    breaks: str
    killers: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Result:
    """The outcome of one mutant: ``killed``, ``SURVIVED`` or ``error`` (the suite could not run)."""

    name: str
    outcome: str
    killed_by: str
    seconds: float


class MutantError(ValueError):
    """A mutant that cannot be applied (its pattern is gone or ambiguous)."""


STEP, SLOTS, ALLOC = "adapad_jax/training/step.py", "adapad_jax/adapters/slots.py", "adapad_jax/methods/allocator.py"
ADAM = "adapad_jax/training/slot_adam.py"
ADAPAD, LORA = "adapad_jax/methods/adapad.py", "adapad_jax/methods/lora.py"
SORA = "adapad_jax/methods/sora.py"
ARDLORA = "adapad_jax/methods/ardlora.py"
INCRELORA = "adapad_jax/methods/increlora.py"
ADALORA = "adapad_jax/methods/adalora.py"
_ADALORA_PEFT = "tests/test_adalora_method.py::test_in_trainer_allocation_equals_peft_update_and_allocate"

MUTANTS: tuple[Mutant, ...] = (
    Mutant("snapshot_never_refreshes",
           (Edit(STEP, "refresh = (step % spec.sync_every == 0) | grew", "refresh = grew & False"),),
           "self-correction: the deflation targets stay at the initial slots forever",
           ("tests/test_snapshot_refresh.py",)),
    Mutant("snapshot_refreshes_only_on_sync",
           (Edit(STEP, "refresh = (step % spec.sync_every == 0) | grew", "refresh = step % spec.sync_every == 0"),),
           "a promoted slot is deflated against stale predecessors until the next sync",
           ("tests/test_snapshot_refresh.py",)),
    Mutant("scale_plain_alpha",
           (Edit(LORA, "float(settings.alpha) / rank", "float(settings.alpha)"),
            Edit(ADAPAD, "float(settings.alpha) / settings.r_max", "float(settings.alpha)")),
           "the adapter scale s = alpha / r (every forward and the export are off by r)",
           ("tests/test_adapter_scaling.py",)),
    Mutant("scale_ignored_in_forward",
           (Edit(ADAPAD, "return self.scaling * weights.astype(jnp.float32)", "return weights.astype(jnp.float32)"),),
           "forward_coefs (eval, joint, lora forward) drops the scale s",
           ("tests/test_adapter_scaling.py",)),
    Mutant("score_importance_only",
           (Edit(ALLOC, "score = imp_ema * unc_ema", "score = imp_ema"),),
           "the allocation score loses its uncertainty factor",
           ("tests/test_allocator.py",)),
    Mutant("growth_without_warm_up",
           (Edit(ALLOC, "(step >= 2 * interval)", "(step >= interval)"),),
           "growth starts after T instead of 2T (no warm-up round for the EMAs)",
           ("tests/test_allocator.py",)),
    Mutant("deflation_prefix_not_frozen",
           (Edit(SLOTS, 'snap_a = jax.lax.stop_gradient(snapshot["a"][m][:num_rows])', 'snap_a = slots["a"][m][:num_rows]'),
            Edit(SLOTS, 'snap_b = jax.lax.stop_gradient(snapshot["b"][m][:num_rows])', 'snap_b = slots["b"][m][:num_rows]')),
           "slot k's prefix is the live slots with their gradient, not the stop-gradient snapshot",
           ("tests/test_slots.py",)),
    Mutant("deflation_prefix_includes_reserves",
           (Edit(SLOTS, "coef = jnp.where(before, committed[m, :num_rows],", "coef = jnp.where(before, live[m, :num_rows],"),),
           "a lower module's reserve is deflated away as if it were committed",
           ("tests/test_slots.py",)),
    Mutant("reserve_out_of_adapad_forward",
           (Edit(SLOTS, "jnp.where(at, live[m, :num_rows], False)", "jnp.where(at, committed[m, :num_rows], False)"),),
           "adapad's advance learning: the reserve slot never enters its own forward, so it never trains",
           ("tests/test_slots.py",)),
    Mutant("reserve_out_of_joint_forward",
           (Edit(ADAPAD, 'weights = weights + JOINT_RESERVE_SCALE * alloc["reserve"]', 'weights = weights + 0.0 * alloc["reserve"]'),),
           "joint's advance learning: the reserve is absent from the train forward (IncreLoRA's E = 1e-5)",
           ("tests/test_train_equivalence.py::test_lora_starts_at_base_model_and_joint_trains_the_reserve_at_increlora_scale",)),
    Mutant("slot_adam_global_count",
           (Edit(ADAM, "slot_c = jnp.maximum(slot_count[m], 1)[:, None]",
                 "slot_c = jnp.broadcast_to(count, slot_count[m].shape)[:, None]"),),
           "per-slot Adam: a late slot is bias-corrected with the global step count (~3.2x first update)",
           ("tests/test_slot_adam.py",)),
    Mutant("head_gradient_summed",
           (Edit(STEP, 'jax.tree.map(lambda g: g / live_slots, grads["head"])', 'grads["head"]'),),
           "the head gets the sum of the L slot losses' gradients instead of their mean",
           ("tests/test_slots.py",)),
    Mutant("export_ignores_committed",
           (Edit(SLOTS, "rows = np.nonzero(committed[m])[0]", "rows = np.arange(committed.shape[1])"),),
           "the exported adapter carries every slot (reserves, unpromoted slots), not the committed ones",
           ("tests/test_train_planted.py",)),
    Mutant("sora_l1_sum_not_mean",
           (Edit(SORA, "eta * jnp.sign(g) / count", "eta * jnp.sign(g)"),),
           "SoRA's L1 term is eta * sum|g| instead of src/trainer.py's mean over every gate",
           ("tests/test_sora_method.py::test_in_trainer_gate_step_matches_a_numpy_sparse_adamw",)),
    Mutant("sora_gates_in_shared_adamw",
           (Edit(SORA, 'return {k: v for k, v in tree.items() if k != "gates"}', "return tree"),),
           "the shared AdamW also steps the gates (the reference removes lora.gate from the main optimiser)",
           ("tests/test_sora_method.py::test_trainer_trains_sora_and_the_rank_is_the_count_of_nonzero_gates",
            "tests/test_sora_method.py::test_in_trainer_gate_step_matches_a_numpy_sparse_adamw")),
    Mutant("sora_gate_lr_one_step_late",
           (Edit(SORA, "lr=self.gate_lr_at(step - 1)", "lr=self.gate_lr_at(step)"),),
           "the gate lr is read one step ahead of run_glue.py's sparse_scheduler (stepped after the gate step)",
           ("tests/test_sora_method.py::test_in_trainer_gate_step_matches_a_numpy_sparse_adamw",)),
    Mutant("ardlora_mask_not_straight_through",
           (Edit(ARDLORA, "mask = slot_mask(alpha, self.r0, self.num_slots, self.tau)",
                 "mask = hard_mask(alpha, self.r0, self.num_slots)"),),
           "ARD-LoRA's train forward uses the hard mask alone: alpha gets no task gradient, only the penalty's",
           ("tests/test_ardlora_method.py::test_forward_coefs_are_hard_forward_soft_backward",
            "tests/test_ardlora_method.py::test_one_trainer_step_matches_the_hand_derivation")),
    Mutant("ardlora_penalty_gradient_dropped",
           (Edit(ARDLORA, 'return {**grads, "alpha": grads["alpha"] + alpha_grad}, penalty, None',
                 'return grads, penalty, None'),),
           "ARD-LoRA's l1 + TV term is logged but never reaches alpha's gradient",
           ("tests/test_ardlora_method.py::test_one_trainer_step_matches_the_hand_derivation",)),
    Mutant("ardlora_rank_frozen_at_r0",
           (Edit(ARDLORA, "new_alloc = self._follow_alpha(alloc, trainable[\"alpha\"])", "new_alloc = alloc"),),
           "ARD-LoRA's rank record (committed rows, rank, the live mask, ranks.json) never follows alpha",
           ("tests/test_ardlora_method.py::test_one_trainer_step_matches_the_hand_derivation",)),
    Mutant("increlora_scale_fixed_at_lora_r",
           (Edit(INCRELORA, 'return module_scale(self.alpha, alloc["rank"].astype(jnp.float32), self.setup.initial_rank)',
                 'return module_scale(self.alpha, 0 * alloc["rank"].astype(jnp.float32) + self.setup.initial_rank, '
                 'self.setup.initial_rank)'),),
           "IncreLoRA's scale alpha / (ranknum + 1e-5) is not recomputed as a module grows",
           ("tests/test_increlora_method.py::test_in_trainer_scores_emas_growth_and_lambda_follow_the_oracle",)),
    Mutant("increlora_reserve_lambda_trains",
           (Edit(INCRELORA, 'new_slots["e"] = [g * e_on[m][:, None] for m, g in enumerate(grads["slots"]["e"])]',
                 'new_slots["e"] = list(grads["slots"]["e"])'),
            Edit(INCRELORA, "return jnp.where((created == FROZEN) | (created_f == step), 0.0, value)",
                 "return jnp.where(created_f == step, 0.0, jnp.where(created == FROZEN, 1.0, value))")),
           "a reserve's E (frozen at 1e-5 in the reference) trains before its promotion",
           ("tests/test_increlora_method.py::test_in_trainer_scores_emas_growth_and_lambda_follow_the_oracle",)),
    Mutant("increlora_lr_never_restarts",
           (Edit(INCRELORA, "return jnp.where(groups == INITIAL_GROUP, 1.0, later).astype(jnp.float32)",
                 "return jnp.where(groups == FROZEN, 0.0, 1.0).astype(jnp.float32)"),),
           "IncreLoRA's Multi_LambdaLR: a new component trains at the shared lr instead of restarting its warm-up",
           ("tests/test_increlora_method.py::test_restarted_learning_rate_in_the_trainer",)),
    Mutant("adalora_global_step_not_shifted",
           (Edit(ADALORA, "global_step = jnp.asarray(step, jnp.int32) - 1",
                 "global_step = jnp.asarray(step, jnp.int32)"),),
           "adalora allocates with the 1-based step (the reference passes global_step before its increment)",
           (_ADALORA_PEFT,)),
    Mutant("adalora_importance_from_unclipped_grads",
           (Edit(ADALORA, "clipped = clip_by_global_norm(grads, float(self.settings.optim.grad_clip))",
                 "clipped = grads"),),
           "adalora's importance EMAs read the raw gradients, not those clip_grad_norm_ left",
           (_ADALORA_PEFT,)),
    Mutant("adalora_final_pattern_not_reapplied",
           (Edit(ADALORA, "jnp.where(after, x_frozen, x)", "x"),),
           "after the final mask, masked triplets' E regrow (the rank pattern is not re-applied each step)",
           ("tests/test_adalora_method.py::test_trainer_trains_and_ranks_follow_the_cubic_schedule",)),
)


def tracked_files(repo: Path) -> list[str]:
    """Repo-relative paths of the tracked files that exist in the working tree."""
    out = subprocess.run(["git", "ls-files", "-z"], cwd=repo, capture_output=True, check=True).stdout
    return [p for p in out.decode().split("\0") if p and (repo / p).is_file()]


def copy_tree(repo: Path, dest: Path) -> None:
    """Copy the tracked files of ``repo`` (as they are in the working tree) under ``dest``."""
    for rel in tracked_files(repo):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / rel, target)


def check_applies(mutant: Mutant, root: Path) -> None:
    """Raise MutantError unless every edit's pattern occurs exactly once in ``root``."""
    for edit in mutant.edits:
        path = root / edit.path
        count = path.read_text().count(edit.pattern) if path.is_file() else 0
        if count != 1:
            raise MutantError(f"mutant {mutant.name}: pattern {edit.pattern!r} occurs {count} times in {edit.path} "
                              "(must be exactly once); update the mutant to the code")


def apply_mutant(mutant: Mutant, root: Path) -> None:
    """Apply ``mutant``'s edits to the tree at ``root`` (after checking every one applies)."""
    check_applies(mutant, root)
    for edit in mutant.edits:
        path = root / edit.path
        path.write_text(path.read_text().replace(edit.pattern, edit.replacement))


def first_failure(output: str) -> str:
    """The first ``FAILED``/``ERROR`` test id in pytest's short summary ('' if none)."""
    match = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.MULTILINE)
    return match.group(1) if match else ""


def run_pytest(root: Path, args: Sequence[str], python: str) -> tuple[int, str]:
    """pytest in ``root`` with ``root`` first on the import path; (return code, combined output)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    cmd = [python, "-m", "pytest", "-q", "-x", "-rfE", "-p", "no:cacheprovider", *FAST, *args]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


def imported_from(root: Path, python: str) -> Path:
    """Where ``adapad_jax`` is imported from when ``root`` is first on the path."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([python, "-c", "import adapad_jax; print(adapad_jax.__file__)"], cwd=root, env=env,
                         capture_output=True, text=True, check=True).stdout
    return Path(out.strip()).resolve()


def baseline(mutants: Sequence[Mutant], python: str, repo: Path = REPO) -> tuple[int, str]:
    """The killers of ``mutants`` on an unmutated copy: they must pass, or a 'kill' would mean nothing."""
    killers = list(dict.fromkeys(k for m in mutants for k in m.killers))
    with tempfile.TemporaryDirectory(prefix="mutant_baseline_") as tmp:
        root = Path(tmp).resolve()
        copy_tree(repo, root)
        return run_pytest(root, killers, python)


def run_mutant(mutant: Mutant, python: str, repo: Path = REPO) -> Result:
    """Run the killers, then the rest of the fast suite, on a mutated copy of the tracked tree."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"mutant_{mutant.name}_") as tmp:
        root = Path(tmp).resolve()
        copy_tree(repo, root)
        apply_mutant(mutant, root)
        origin = imported_from(root, python)
        if root not in origin.parents:
            raise RuntimeError(f"adapad_jax was imported from {origin}, not from the mutated copy {root}")
        outcome, killed_by = "SURVIVED", ""
        for phase in (list(mutant.killers), ["tests", *(f"--deselect={k}" for k in mutant.killers)]):
            code, output = run_pytest(root, phase, python)
            if code == 1:
                outcome, killed_by = "killed", first_failure(output) or "?"
                break
            if code not in (0, 5):  # 5: nothing collected (every test deselected)
                outcome, killed_by = "error", f"pytest exit {code}: {output.strip().splitlines()[-1:]}"
                break
    return Result(mutant.name, outcome, killed_by, time.perf_counter() - start)


def summary(results: Sequence[Result]) -> str:
    """A markdown table: mutant, outcome, the test that killed it, seconds."""
    lines = ["| mutant | outcome | killed by | seconds |", "|---|---|---|---|"]
    lines += [f"| {r.name} | {r.outcome} | {r.killed_by or '-'} | {r.seconds:.0f} |" for r in results]
    survivors = [r.name for r in results if r.outcome != "killed"]
    lines.append("")
    lines.append(f"{len(results) - len(survivors)} of {len(results)} killed"
                 + (f"; not killed: {', '.join(survivors)}" if survivors else ""))
    return "\n".join(lines)


def select(names: Sequence[str] | None) -> list[Mutant]:
    """The mutants named in ``names`` (all when empty); an unknown name is an error."""
    if not names:
        return list(MUTANTS)
    known = {m.name: m for m in MUTANTS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise MutantError(f"unknown mutant(s) {unknown}; known: {', '.join(known)}")
    return [known[n] for n in names]


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: run the selected mutants and print the table; exit 1 if any is not killed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", help="run only this mutant (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutants and what each breaks")
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs pytest")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip checking that the killer tests pass on the unmutated tree")
    args = parser.parse_args(argv)
    try:
        mutants = select(args.only)
        for mutant in mutants:  # fail before any run if a pattern has rotted
            check_applies(mutant, REPO)
    except MutantError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.list:
        for mutant in mutants:
            print(f"{mutant.name}: {mutant.breaks} [{', '.join(e.path for e in mutant.edits)}]")
        return 0
    if not args.no_baseline:
        code, output = baseline(mutants, args.python)
        if code != 0:
            print(f"error: the killer tests fail on the unmutated tree ({first_failure(output) or output[-500:]})",
                  file=sys.stderr)
            return 2
    results = []
    for mutant in mutants:
        result = run_mutant(mutant, args.python)
        print(f"{result.name}: {result.outcome} {result.killed_by} ({result.seconds:.0f} s)", flush=True)
        results.append(result)
    print()
    print(summary(results))
    return 0 if all(r.outcome == "killed" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
