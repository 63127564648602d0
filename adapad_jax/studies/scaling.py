"""Component-parallel scaling across processes: one process per core, joined with ``jax.distributed``.

XLA:CPU spreads one device's matmuls over every core, so simulated host devices cannot show the paper's
component parallelism on a CPU. Processes pinned to one core each can: ``run_scaling`` times the real AdaPaD
train step (``L`` live slots, ``slot_chunk_size`` 1) as one process on one core with ``mesh.components = 1``,
and as ``P`` processes on ``P`` cores with ``mesh.components = P``, same model and global batch. The timed
steps are ones the trainer does not log (``benchmarking.UNLOGGED_STEPS``), as nine in ten steps of a real run.

Each worker also profiles its steps and sums the time spent in the step's own collectives (the instructions
read from the compiled step's HLO; waiting for the other processes included), so the report can say what share
of a step they take. Run it with ``python launch/benchmark.py --suite scaling``.
"""

from __future__ import annotations

import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[2]

# DeBERTaV3-base's width and depth (12 blocks of 768), at a batch where one step takes about 0.75 CPU-seconds at
# L = 4 on this machine (>= 0.5 s on one core). The depth matters: the embedding and the first block's frozen
# projection do not depend on the adapters, so every process computes them (1 / (2 * layers) of a forward).
DEFAULT_SIZE = {"hidden": 768, "num_layers": 12, "batch_size": 128, "seq_len": 16}
QUICK_SIZE = {"hidden": 64, "num_layers": 1, "batch_size": 8, "seq_len": 4}
SIZE_FIELDS = ("hidden", "num_layers", "batch_size", "seq_len")


def parse_shape(text: str) -> dict[str, int]:
    """``"HIDDEN,LAYERS,BATCH,SEQ"`` (e.g. ``"768,12,128,16"``) as a size dict; ValueError naming the problem."""
    parts = [part.strip() for part in text.split(",")]
    if len(parts) != len(SIZE_FIELDS) or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise ValueError(f"--shape {text!r}: expected four positive integers HIDDEN,LAYERS,BATCH,SEQ, "
                         f"e.g. 768,12,128,16")
    return dict(zip(SIZE_FIELDS, map(int, parts)))

_HLO_COLLECTIVE = re.compile(r"=\s*(.*?)\s(all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)"
                             r"(?:-start)?\(")
_HLO_SHAPE = re.compile(r"\b(f32|bf16|f16|s32|u32|pred|s8|u8|f64|s64|u64)\[([0-9,]*)\]")
_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1, "f64": 8,
                "s64": 8, "u64": 8}


_HLO_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_HLO_BRANCHES = re.compile(r"(?:branch_computations=\{([^}]*)\}|true_computation=%?([\w.\-]+)"
                           r"|false_computation=%?([\w.\-]+))")
_HLO_REFERENCE = re.compile(r"%([\w.\-]+)")


def hlo_collectives(hlo_text: str) -> list[dict[str, Any]]:
    """Every cross-device collective in an HLO module's text: ``{"op", "bytes", "conditional", "name"}`` each.

    ``name`` is the instruction's (what a profile of the program calls it); ``bytes`` counts the result;
    ``conditional`` says the collective sits in a branch of a ``conditional`` (or in a computation such a branch
    calls), so it runs only on the steps that take that branch.
    """
    found, computation, calls, branches = [], None, {}, set()
    for line in hlo_text.splitlines():
        header = _HLO_COMPUTATION.match(line)
        if header:
            computation = header.group(1)
            calls[computation] = set()
            continue
        if computation is not None:
            calls[computation].update(_HLO_REFERENCE.findall(line.split("metadata=")[0]))
        for match in _HLO_BRANCHES.finditer(line):
            names = match.group(1) or match.group(2) or match.group(3)
            branches.update(name.strip().lstrip("%") for name in names.split(","))
        match = _HLO_COLLECTIVE.search(line)
        if not match or "-done" in line.split("=")[-1].split("(")[0]:
            continue
        size = 0
        for dtype, dims in _HLO_SHAPE.findall(match.group(1)):
            count = 1
            for dim in filter(None, dims.split(",")):
                count *= int(dim)
            size += count * _DTYPE_BYTES[dtype]
        name = line.split("=")[0].strip().removeprefix("ROOT ").lstrip("%")
        found.append({"op": match.group(2), "bytes": size, "computation": computation, "name": name})
    conditional, frontier = set(), set(branches)
    while frontier:
        name = frontier.pop()
        if name not in conditional:
            conditional.add(name)
            frontier |= calls.get(name, set()) & calls.keys()
    return [{"op": c["op"], "bytes": c["bytes"], "conditional": c["computation"] in conditional, "name": c["name"]}
            for c in found]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------------- worker


def _cpu_seconds() -> float:
    return time.process_time()  # every thread of the process


def _page_faults() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _collective_seconds_in_steps(trainer, batches: list, collectives: list[dict[str, Any]]) -> tuple[float, float]:
    """Seconds per step the compiled step spends in its own collectives (waiting for the peers included), and
    the profiled steps' own seconds per step (tracing slows them, so the share is taken against unprofiled steps).

    Runs the steps under ``jax.profiler`` and sums the events named after the step's collective instructions.
    """
    import jax
    from jax.profiler import ProfileData

    names = {c["name"] for c in collectives}
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            start = time.perf_counter()
            for batch in batches:
                jax.block_until_ready(trainer.train_step(batch))
            step_s = (time.perf_counter() - start) / len(batches)
        trace = next(Path(trace_dir).rglob("*.xplane.pb"))
        profile = ProfileData.from_file(str(trace))
        total = sum(event.duration_ns for plane in profile.planes for line in plane.lines for event in line.events
                    if event.name.removeprefix("end: ") in names)
    return total / 1e9 / len(batches), step_s


def scaling_worker(processes: int, process_id: int, port: int, core: int | None, live_slots: int, repeats: int,
                   size: dict[str, int], independent: bool = False) -> dict[str, Any]:
    """One process of a scaling run: pin to ``core``, join the others, time the train step; returns a JSON row.

    ``independent``: do not join; run the one-process step (``mesh.components = 1``) beside the other workers, to
    time what running ``processes`` copies at once costs the hardware (shared caches, memory bandwidth).
    """
    if core is not None:
        os.sched_setaffinity(0, {core})
    import jax

    if independent:
        processes = 1
    elif processes > 1:
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=processes,
                                   process_id=process_id, initialization_timeout=120)
    from adapad_jax.studies.benchmarking import UNLOGGED_STEPS
    from adapad_jax.training.sharding import make_mesh
    from adapad_jax.testing.toy import make_toy_model, planted_teacher, toy_batch, toy_config
    from adapad_jax.training.trainer import Trainer

    model = make_toy_model(hidden=size["hidden"], num_layers=size["num_layers"], vocab_size=512)
    teacher = planted_teacher(model, [1] * len(model.targets))
    overrides = {"adapter.method": "adapad", "adapter.r_max": 8, "adapter.grow": False,
                 "adapter.initial_rank": live_slots, "adapter.rank_budget": 8 * len(model.targets),
                 "adapter.slot_chunk_size": 1, "checkpoint.every_steps": 0, "mesh.data": 1,
                 "mesh.components": processes, **UNLOGGED_STEPS}
    batches = [toy_batch(model, teacher, i, size["batch_size"], size["seq_len"]) for i in range(repeats + 1)]
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model, toy_config(**overrides), make_mesh(1, processes), out)
        trainer.restore_or_init({})
        live = trainer.live_slots
        start = time.perf_counter()
        compiled = trainer.compiled_step().lower(trainer.state, trainer.frozen,
                                                 trainer.put_batch(batches[0])).compile()
        compile_s = time.perf_counter() - start
        collectives = hlo_collectives(compiled.as_text())
        jax.block_until_ready(trainer.train_step(batches[0]))  # warm-up: first call's allocations
        times, cpu, faults = [], [], []
        for batch in batches[1:]:
            start, cpu_start, faults_start = time.perf_counter(), _cpu_seconds(), _page_faults()
            jax.block_until_ready(trainer.train_step(batch))
            times.append(time.perf_counter() - start)
            cpu.append(_cpu_seconds() - cpu_start)
            faults.append(_page_faults() - faults_start)
        # the same steps in every setup: the same slot losses
        slot_losses = [float(x) for x in jax.device_get(trainer.train_step(batches[0])["slot_losses"])[:live]]
        comm, profiled_s = (_collective_seconds_in_steps(trainer, batches[1:], collectives) if processes > 1
                            else (0.0, 0.0))
        trainer.close()
    return {"process_id": process_id, "processes": processes, "core": core, "live_slots": live,
            "median_s": statistics.median(times), "min_s": min(times), "times_s": times,
            "cpu_median_s": statistics.median(cpu), "page_faults": statistics.median(faults), "compile_s": compile_s,
            "collectives": collectives, "comm_s": comm, "profiled_step_s": profiled_s,
            "slot_losses": slot_losses, "device": jax.devices()[0].device_kind,
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}


# ---------------------------------------------------------------------------------------------- launcher


def _worker_env() -> dict[str, str]:
    """The workers' environment: one CPU device each, no inherited multi-process settings, and the malloc
    settings ``adapad-train`` runs under (``host_malloc``), so the step is timed as a training run takes it."""
    from adapad_jax.runtime.host_malloc import cpu_worker_environment

    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(name, None)
    return cpu_worker_environment(env)


def launch_processes(processes: int, cores: Sequence[int | None], live_slots: int, repeats: int,
                     size: dict[str, int], timeout_s: float, independent: bool = False) -> list[dict[str, Any]]:
    """Start ``processes`` workers (worker i pinned to ``cores[i]``), wait at most ``timeout_s``, return their rows.

    Every worker is killed if any fails or the time runs out; raises RuntimeError naming the failure.
    """
    port = free_port()
    procs = []
    logs = []
    try:
        for process_id in range(processes):
            args = [sys.executable, "-m", "adapad_jax.studies.scaling", json.dumps({
                "processes": processes, "process_id": process_id, "port": port, "core": cores[process_id],
                "live_slots": live_slots, "repeats": repeats, "size": size, "independent": independent})]
            log = tempfile.TemporaryFile(mode="w+")
            logs.append(log)
            procs.append(subprocess.Popen(args, env=_worker_env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                          text=True))
        deadline = time.monotonic() + timeout_s
        for proc in procs:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"scaling run with {processes} processes did not finish within {timeout_s:.0f} s") from None
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    rows = []
    for proc, log in zip(procs, logs):
        log.seek(0)
        text = log.read()
        log.close()
        if proc.returncode != 0:
            tail = [line for line in text.strip().splitlines() if line.strip()][-1:] or ["no output"]
            raise RuntimeError(f"scaling worker exited with {proc.returncode}: {tail[0]}")
        rows.append(json.loads(text.strip().splitlines()[-1]))
    return rows


def run_scaling(process_counts: Sequence[int] = (2,), live_slots: int = 4, repeats: int = 5, rounds: int = 2,
                size: dict[str, int] | None = None, timeout_s: float = 900.0) -> dict[str, Any]:
    """T1 (one process, one core) vs TP (P processes, a core each) for each P, alternated over ``rounds``.

    Returns ``{"rows": [...], "runs": [...]}``: per P the best-of-rounds medians, speedup T1/TP, efficiency
    T1/(P*TP), the collectives' share of the step, and CPU seconds per step summed over processes (with their
    ratio to one process: the work the split adds, which other load on the machine affects less than wall time).

    Each round also runs P independent one-process copies at once, one per core, with no communication: the
    ``ceiling`` T1 / T(copies) is the efficiency the cores reach when nothing is shared but the hardware (caches,
    memory bandwidth; on a VM, maybe a physical core), and ``of_ceiling`` = efficiency / ceiling is the part the
    split itself loses.
    """
    size = dict(size or DEFAULT_SIZE)
    cores = sorted(os.sched_getaffinity(0))
    if max(process_counts) > len(cores):
        raise ValueError(f"scaling: P={max(process_counts)} processes need as many cores, this process may use "
                         f"{len(cores)} ({cores})")
    for count in process_counts:
        if count < 1 or 8 % count or live_slots % count:
            raise ValueError(f"scaling: P={count} must divide r_max=8 and L={live_slots}")
    runs = []
    for round_index in range(rounds):
        for count in (1, *[c for c in process_counts if c != 1]):
            rows = launch_processes(count, cores[:count], live_slots, repeats, size, timeout_s)
            runs.append({"round": round_index, "processes": count, "workers": rows})
            if count > 1:
                rows = launch_processes(count, cores[:count], live_slots, repeats, size, timeout_s, independent=True)
                runs.append({"round": round_index, "processes": count, "independent": True, "workers": rows})
    return {"rows": summarize_runs(runs), "runs": runs, "size": size, "repeats": repeats, "rounds": rounds}


def summarize_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The table rows of ``run_scaling`` from its runs (``{"round", "processes", "independent"?, "workers"}``)."""
    table = []
    best, copies = {}, {}
    # Each round's own steps: their efficiencies' spread says how much of a difference between two invocations
    # is the machine's noise.
    per_round: dict[int, dict[int, float]] = {}
    for run in runs:
        # A step ends when its slowest process ends; the collectives keep them in lock step anyway.
        step = max(w["median_s"] for w in run["workers"])
        count = run["processes"]
        if run.get("independent"):
            copies[count] = min(step, copies.get(count, step))
            continue
        per_round.setdefault(run["round"], {})[count] = step
        cpu = sum(w["cpu_median_s"] for w in run["workers"])
        comm = max(w["comm_s"] for w in run["workers"])
        if count not in best or step < best[count]["step_s"]:
            best[count] = {"step_s": step, "cpu_s": cpu, "comm_s": comm, "workers": run["workers"]}
    t1 = best[1]["step_s"]
    copies[1] = t1
    for count in sorted(best):
        entry = best[count]
        every_step = [c for c in entry["workers"][0]["collectives"] if not c.get("conditional")]
        at_sync = [c for c in entry["workers"][0]["collectives"] if c.get("conditional")]
        efficiency, ceiling = t1 / (count * entry["step_s"]), t1 / copies[count]
        table.append({
            "processes": count, "live_slots": entry["workers"][0]["live_slots"], "step_s": entry["step_s"],
            "speedup": t1 / entry["step_s"], "efficiency": efficiency, "ceiling": ceiling,
            "of_ceiling": efficiency / ceiling,
            "round_efficiencies": [steps[1] / (count * steps[count]) for _, steps in sorted(per_round.items())],
            "page_faults": max(w.get("page_faults", 0) for w in entry["workers"]),
            "cpu_s": entry["cpu_s"], "cpu_efficiency": best[1]["cpu_s"] / max(entry["cpu_s"], 1e-9),
            "comm_s": entry["comm_s"], "comm_share": entry["comm_s"] / entry["step_s"],
            "collectives_per_step": len(every_step), "collective_bytes": sum(c["bytes"] for c in every_step),
            "sync_collectives": len(at_sync), "sync_collective_bytes": sum(c["bytes"] for c in at_sync),
            "slot_losses": entry["workers"][0]["slot_losses"],
        })
    return table


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    print(json.dumps(scaling_worker(**spec)), flush=True)
