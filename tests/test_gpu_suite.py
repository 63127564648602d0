"""`launch/benchmark.py --suite gpu`: one-line failure without a GPU; its step timer on a tiny model (CPU)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

from adapad_jax.models.registry import model_from_config
from adapad_jax.testing import tiny
from adapad_jax.studies.benchmarking import time_real_step

REPO = Path(__file__).resolve().parents[1]


def _benchmark_module():
    spec = importlib.util.spec_from_file_location("benchmark_launch", REPO / "launch" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_suite_fails_fast_with_one_line_without_a_gpu(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "benchmark.py"), "--suite", "gpu",
                           "--out", str(tmp_path / "gpu.json")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --suite gpu needs a GPU"), proc.stderr
    assert not (tmp_path / "gpu.json").exists() and not (tmp_path / "gpu.md").exists()


def test_models_suite_refuses_a_missing_preload_library_before_any_work(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "benchmark.py"), "--suite", "models", "--preload",
                           str(tmp_path / "missing.so"), "--out", str(tmp_path / "m.json")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--preload" in proc.stderr and "no such file" in proc.stderr, proc.stderr
    assert proc.stdout == "" and not (tmp_path / "m.json").exists()



def test_slots_suite_refuses_a_log_every_below_one_before_any_work(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "benchmark.py"), "--suite", "slots", "--log_every",
                           "0", "--out", str(tmp_path / "s.json")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--log_every must be >= 1, got 0" in proc.stderr.splitlines()[-1], proc.stderr
    assert proc.stdout == "" and not (tmp_path / "s.json").exists()


def test_slots_suite_passes_log_every_and_grad_accum_to_its_workers(monkeypatch):
    bench = _benchmark_module()
    calls = []
    monkeypatch.setattr(bench, "_run_worker", lambda args: calls.append(args) or {"median_s": 1.0})
    rows = bench.suite_slots(type("Args", (), {"repeats": 3, "log_every": 1, "grad_accum_steps": 2})(), [0])
    assert calls and all(call[0] == "slots" and call[-2:] == ["1", "2"] for call in calls)
    assert [row["live_slots"] for row in rows] == [1, 1, 2, 4, 8]

def test_models_suite_workers_get_the_preloaded_library(monkeypatch):
    bench = _benchmark_module()
    seen = {}

    def fake_popen(args, **kwargs):
        seen.update(kwargs["env"])
        raise OSError("not started")

    monkeypatch.setattr(bench.subprocess, "Popen", fake_popen)
    with pytest.raises(OSError):
        bench._Server("jax", "deberta-v3-base", "fwd", 4, 128, 10.0, core=1, preload="/lib/libfast.so")
    assert seen["LD_PRELOAD"] == "/lib/libfast.so" and seen["ADAPAD_BENCH_CORE"] == "1"


@pytest.mark.parametrize("malloc", ["tuned", "system"])
def test_models_suite_runs_both_sides_under_the_training_commands_malloc(monkeypatch, malloc):
    from adapad_jax.runtime.host_malloc import OPT_OUT, TUNABLES

    bench = _benchmark_module()
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    envs = []

    def fake_popen(args, **kwargs):
        envs.append(kwargs["env"])
        raise OSError("not started")

    monkeypatch.setattr(bench.subprocess, "Popen", fake_popen)
    for fw in ("jax", "torch"):
        with pytest.raises(OSError):
            bench._Server(fw, "deberta-v3-base", "fwd", 4, 128, 10.0, malloc=malloc)
    for env in envs:
        if malloc == "tuned":
            assert env["GLIBC_TUNABLES"] == ":".join(TUNABLES)
        else:
            assert "GLIBC_TUNABLES" not in env and env[OPT_OUT] == "system"


def test_peak_flops_by_device_kind():
    bench = _benchmark_module()
    assert bench.peak_flops("NVIDIA H200", "bfloat16") == 989e12
    assert bench.peak_flops("NVIDIA A100-SXM4-80GB", "float32") == 156e12
    assert bench.peak_flops("cpu", "bfloat16") is None


@pytest.mark.parametrize("method, live, chunk, remat", [("lora", 2, 1, False), ("adapad", 2, 0, True)])
def test_time_real_step_reports_time_flops_and_temporaries(method, live, chunk, remat):
    model = model_from_config(tiny.tiny_deberta_config(), task="classification", num_labels=2, dtype=jnp.float32)
    row = time_real_step(model, method, live, 4, 16, slot_chunk_size=chunk, remat=remat, repeats=2)
    assert row["live_slots"] == live and row["remat"] == remat
    assert 0 < row["min_s"] <= row["median_s"] and row["flops"] > 0 and row["temp_bytes"] > 0


def test_models_suite_alternates_sides_and_swaps_who_goes_first():
    bench = _benchmark_module()
    calls = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def ask(self, command):
            calls.append((self.name, command))
            return {"s": float(len(calls)), "page_faults": 10 * len(calls)}

    times, faults = bench.alternate_rounds({"jax": Fake("jax"), "torch": Fake("torch")}, 3)
    assert [name for name, _ in calls] == ["jax", "torch", "torch", "jax", "jax", "torch"]
    assert times == {"jax": [1.0, 4.0, 5.0], "torch": [2.0, 3.0, 6.0]}
    assert faults == {"jax": [10, 40, 50], "torch": [20, 30, 60]}
