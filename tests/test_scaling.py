"""Packed collectives (against per-leaf lax collectives), HLO collective counting, and the scaling suite's
two-process smoke run (`launch/benchmark.py --suite scaling --quick`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from adapad_jax.training.collectives import psum_packed
from adapad_jax.studies.scaling import hlo_collectives
from adapad_jax.training.sharding import COMPONENTS_AXIS, DATA_AXIS, make_mesh

REPO = Path(__file__).resolve().parents[1]


def _tree(rng, rows):
    return {"a": [jnp.asarray(rng.normal(size=(rows, 3)), jnp.float32), jnp.asarray(rng.normal(size=(rows, 5)),
                                                                                      jnp.float32)],
            "h": {"w": jnp.asarray(rng.normal(size=(rows, 2, 2)), jnp.bfloat16),
                  "n": jnp.asarray(rng.integers(0, 9, size=(rows,)), jnp.int32)}}


def test_packed_psum_equals_per_leaf_psums_and_uses_one_op_per_dtype():
    mesh = make_mesh(2, 4)
    tree = _tree(np.random.default_rng(0), 8)

    def packed(t):
        return psum_packed(t, (DATA_AXIS, COMPONENTS_AXIS))

    def per_leaf(t):
        return jax.tree.map(lambda x: jax.lax.psum(x, (DATA_AXIS, COMPONENTS_AXIS)), t)

    def run(fn):
        sharded = jax.shard_map(fn, mesh=mesh, in_specs=P(COMPONENTS_AXIS), out_specs=P(DATA_AXIS), check_vma=False)
        return jax.jit(sharded)

    got, want = run(packed)(tree), run(per_leaf)(tree)
    jax.tree.map(lambda g, w: np.testing.assert_array_equal(np.asarray(g, np.float64), np.asarray(w, np.float64)),
                 got, want)
    ops = hlo_collectives(run(packed).lower(tree).compile().as_text())
    # three dtypes (f32, bf16, s32): at most one all-reduce each (XLA may fuse further)
    names = [op["op"] for op in ops]
    assert set(names) == {"all-reduce"} and 1 <= len(names) <= 3, names


def test_hlo_collectives_reads_ops_result_bytes_and_which_run_only_in_a_branch():
    text = "\n".join([
        "%gather_it (p.1: f32[1,10]) -> f32[2,10] {",
        "  %p.1 = f32[1,10]{1,0} parameter(0)",
        "  ROOT %g = f32[2,10]{1,0} all-gather(%p.1), dimensions={0}",
        "}",
        "%sync_branch (p.2: f32[1,10]) -> f32[2,10] {",
        "  %p.2 = f32[1,10]{1,0} parameter(0)",
        "  ROOT %c = f32[2,10]{1,0} call(%p.2), to_apply=%gather_it",
        "}",
        "%keep_branch (p.3: f32[1,10]) -> f32[2,10] {",
        "  ROOT %k = f32[2,10]{1,0} broadcast(%p.3), dimensions={1}",
        "}",
        "ENTRY %main (a: f32[8,1024], b: bf16[4], x: f32[1,10], flag: pred[]) -> f32[2,10] {",
        "  %all-reduce.1 = (f32[8,1024]{1,0}, bf16[4]{0}) all-reduce(%a, %b), replica_groups={{0,1}}",
        "  %ag = f32[2,10]{1,0} all-gather-start(%x), dimensions={0}",
        "  %ag.done = f32[2,10]{1,0} all-gather-done(%ag)",
        "  %dot = f32[8,8]{1,0} dot(%x, %y)",
        "  ROOT %cond = f32[2,10]{1,0} conditional(%flag, %x, %x), branch_computations={%sync_branch, %keep_branch}",
        "}",
    ])
    assert hlo_collectives(text) == [{"op": "all-gather", "bytes": 80, "conditional": True, "name": "g"},
                                     {"op": "all-reduce", "bytes": 8 * 1024 * 4 + 4 * 2, "conditional": False,
                                      "name": "all-reduce.1"},
                                     {"op": "all-gather", "bytes": 80, "conditional": False, "name": "ag"}]


@pytest.mark.slow
def test_scaling_suite_quick_runs_two_pinned_processes_and_reports_its_fields(tmp_path):
    import os

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two cores")
    out = tmp_path / "scaling.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "benchmark.py"), "--suite", "scaling", "--quick", "--repeats", "2",
         "--rounds", "1", "--live_slots", "2", "--timeout", "240", "--out", str(out)],
        capture_output=True, text=True, timeout=400, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "load average" in proc.stdout and "| 2 |" in proc.stdout
    result = json.loads(out.read_text())
    rows = {row["processes"]: row for row in result["rows"]}
    assert sorted(rows) == [1, 2]
    for field in ("step_s", "speedup", "efficiency", "comm_s", "comm_share", "collectives_per_step", "cpu_s"):
        assert all(np.isfinite(row[field]) for row in rows.values()), field
    # the profiled time in the step's collectives is part of the (profiled) step
    two_workers = next(run for run in result["runs"] if run["processes"] == 2 and not run.get("independent"))
    assert all(0 < w["comm_s"] < w["profiled_step_s"] for w in two_workers["workers"])
    assert rows[1]["efficiency"] == 1.0
    np.testing.assert_allclose(rows[2]["efficiency"], rows[1]["step_s"] / (2 * rows[2]["step_s"]))
    np.testing.assert_allclose(rows[2]["round_efficiencies"], [rows[2]["efficiency"]])  # one round
    # the hardware ceiling: two independent one-process copies, one per core, run beside each other
    copies = [run for run in result["runs"] if run.get("independent")]
    assert [run["processes"] for run in copies] == [2] and len(copies[0]["workers"]) == 2
    one = next(run for run in result["runs"] if run["processes"] == 1)["workers"][0]
    assert all(w["processes"] == 1 and w["collectives"] == one["collectives"] for w in copies[0]["workers"])
    np.testing.assert_allclose(rows[2]["ceiling"],
                               rows[1]["step_s"] / max(w["median_s"] for w in copies[0]["workers"]))
    np.testing.assert_allclose(rows[2]["of_ceiling"], rows[2]["efficiency"] / rows[2]["ceiling"])
    two = next(run for run in result["runs"] if run["processes"] == 2)["workers"]
    assert sorted(w["process_id"] for w in two) == [0, 1]
    assert len({w["core"] for w in two}) == 2  # each pinned to its own core
    # the split run computes the same step: same loss as one process
    np.testing.assert_allclose(rows[2]["slot_losses"], rows[1]["slot_losses"], rtol=1e-5)
    assert len(rows[1]["slot_losses"]) == 2
    # every step crosses processes once: one packed all-reduce (gradients, slot losses, committed loss); the
    # snapshot refresh at a sync is a local copy
    assert [op["op"] for op in two[0]["collectives"]] == ["all-reduce"], two[0]["collectives"]
    assert rows[2]["collectives_per_step"] == 1 and rows[2]["sync_collectives"] == 0
    # timed as adapad-train runs: under its malloc tunables (0 page faults per step once warm)
    from adapad_jax.runtime.host_malloc import TUNABLES

    if "malloc" not in os.environ.get("LD_PRELOAD", "") and "glibc.malloc" not in os.environ.get("GLIBC_TUNABLES", ""):
        assert all(w["glibc_tunables"].endswith(":".join(TUNABLES)) for run in result["runs"] for w in run["workers"])
    assert all(row["page_faults"] >= 0 for row in rows.values())


def test_scaling_refuses_more_processes_than_cores():
    from adapad_jax.studies.scaling import run_scaling

    with pytest.raises(ValueError, match="need as many cores"):
        run_scaling((len(__import__("os").sched_getaffinity(0)) + 1,))


def test_scaling_shape_is_four_positive_integers_or_one_clear_error():
    from adapad_jax.studies.scaling import DEFAULT_SIZE, parse_shape

    assert parse_shape("768, 12,128,16") == DEFAULT_SIZE
    for bad in ("768,12,128", "768,12,0,16", "768,x,128,16", ""):
        with pytest.raises(ValueError, match="four positive integers HIDDEN,LAYERS,BATCH,SEQ"):
            parse_shape(bad)
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "benchmark.py"), "--suite", "scaling", "--shape",
                           "768,12"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and "four positive integers" in proc.stderr.splitlines()[-1]
    assert "toy model" not in proc.stdout  # refused before any work


def test_scaling_summary_keeps_the_best_round_of_each_setup_and_every_rounds_own_efficiency():
    from adapad_jax.studies.scaling import summarize_runs

    def run(round_index, processes, medians, independent=False):
        workers = [{"median_s": m, "cpu_median_s": m, "comm_s": 0.01 * (processes > 1), "live_slots": 4,
                    "collectives": [{"op": "all-reduce", "bytes": 8, "conditional": False, "name": "x"}],
                    "slot_losses": [1.0]} for m in medians]
        return {"round": round_index, "processes": processes, "workers": workers,
                **({"independent": True} if independent else {})}

    runs = [run(0, 1, [1.0]), run(0, 2, [0.55, 0.60]), run(0, 2, [1.1, 1.05], independent=True),
            run(1, 1, [0.9]), run(1, 2, [0.50, 0.52]), run(1, 2, [0.95, 1.0], independent=True)]
    one, two = summarize_runs(runs)
    assert one["step_s"] == 0.9 and one["round_efficiencies"] == [1.0, 1.0]
    # the slowest process ends a step; best of rounds: 0.52 (round 1) against T1 = 0.9 (round 1)
    assert two["step_s"] == 0.52
    np.testing.assert_allclose(two["efficiency"], 0.9 / (2 * 0.52))
    np.testing.assert_allclose(two["round_efficiencies"], [1.0 / (2 * 0.60), 0.9 / (2 * 0.52)])
    np.testing.assert_allclose(two["ceiling"], 0.9 / 1.0)  # best copies round: the slower copy, 1.0 s
    assert two["collectives_per_step"] == 1 and two["comm_s"] == 0.01


def test_packed_psum_over_one_device_axes_emits_nothing():
    mesh = make_mesh(1, 2)
    tree = _tree(np.random.default_rng(1), 4)

    def run(axes):
        return jax.jit(jax.shard_map(lambda t: psum_packed(t, axes), mesh=mesh, in_specs=P(COMPONENTS_AXIS),
                                     out_specs=P(COMPONENTS_AXIS), check_vma=False))

    alone = run(DATA_AXIS)  # data spans one device
    jax.tree.map(lambda g, w: np.testing.assert_array_equal(np.asarray(g, np.float64), np.asarray(w, np.float64)),
                 alone(tree), tree)
    assert hlo_collectives(alone.lower(tree).compile().as_text()) == []
    both = hlo_collectives(run((DATA_AXIS, COMPONENTS_AXIS)).lower(tree).compile().as_text())
    assert both and {op["op"] for op in both} == {"all-reduce"}
