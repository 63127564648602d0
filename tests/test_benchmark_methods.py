"""`launch/benchmark.py --suite methods`: every method's step against lora's, alternating, unavailable methods
reported; the suite's arithmetic on scripted workers, and the real workers end to end (slow)."""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _benchmark_module():
    spec = importlib.util.spec_from_file_location("benchmark_launch_methods", REPO / "launch" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Scripted:
    """A stand-in for one method's worker process: answers from a script, records the order of its calls."""

    calls: list[str] = []
    times = {"lora": [0.010, 0.012, 0.011, 0.013], "joint": [0.012, 0.015, 0.013, 0.014]}
    temp = {"lora": 2 * 2**20, "joint": 3 * 2**20}
    peak = {"lora": 500.0, "joint": 550.0}

    def __init__(self, fw, name, mode, batch, seq, timeout_s, worker):
        self.method = worker[1]
        self.count = 0

    def ask(self, command=None):
        if self.method == "sora":
            raise RuntimeError("ConfigError: adapter.method=sora: SoRA is not wired into the trainer yet")
        if command is None:
            return {"ready": True, "first_call_s": 1.0, "temp_bytes": self.temp[self.method], "live_rows": 2}
        if command == "peak":
            return {"peak_mib": self.peak[self.method], "resident_mib": 1.0}
        _Scripted.calls.append(self.method)
        self.count += 1
        return {"s": self.times[self.method][self.count - 1], "page_faults": 0}

    def close(self):
        pass


def test_methods_suite_ratios_and_unavailable_methods(monkeypatch, capsys):
    bench = _benchmark_module()
    monkeypatch.setattr(bench, "_Server", _Scripted)
    _Scripted.calls = []
    args = type("Args", (), dict(methods="joint,sora", method_model="toy", batch=8, seq=4, timeout=5.0,
                                 repeats=4))()
    rows = bench.suite_methods(args)
    by_method = {row["method"]: row for row in rows}
    assert [row["method"] for row in rows] == ["lora", "joint", "sora"]
    # Rotated rounds: each side goes first in every other round.
    assert _Scripted.calls == ["lora", "joint", "joint", "lora", "lora", "joint", "joint", "lora"]
    joint, lora = by_method["joint"], by_method["lora"]
    assert joint["ratio_of_medians"] == pytest.approx(0.0135 / 0.0115)
    assert joint["ratio_of_mins"] == pytest.approx(0.012 / 0.010)
    assert joint["mean_s"] == pytest.approx(statistics.fmean(_Scripted.times["joint"]))
    assert joint["temp_ratio"] == pytest.approx(1.5) and joint["peak_ratio"] == pytest.approx(1.1)
    assert lora["ratio_of_medians"] == 1.0
    assert by_method["sora"] == {"method": "sora", "available": False,
                                 "reason": "ConfigError: adapter.method=sora: SoRA is not wired into the trainer yet"}
    printed = capsys.readouterr().out
    assert "| sora | not available (ConfigError: adapter.method=sora" in printed
    assert "| joint | 2 | 12.00 / 13.50 / 13.50 ms | **1.17** | 1.20 | 3.0 MiB | 1.50 | 550 MiB | 1.10 |" in printed


def test_methods_suite_refuses_an_unknown_method_before_any_work():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "benchmark.py"), "--suite", "methods", "--methods",
                           "joint,dora"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].endswith("--methods: unknown ['dora']; choose from "
                                                        "['lora', 'adapad', 'joint', 'adalora', 'increlora', 'sora', "
                                                        "'ardlora']"), proc.stderr


@pytest.mark.slow
def test_methods_suite_times_real_steps(tmp_path):
    out = tmp_path / "methods.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "benchmark.py"), "--suite", "methods", "--methods",
                           "joint", "--batch", "16", "--seq", "8", "--repeats", "3", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {row["method"]: row for row in json.loads(out.read_text())}
    assert set(rows) == {"lora", "joint"}
    for row in rows.values():
        assert len(row["times_s"]) == 3 and all(t > 0 for t in row["times_s"])
        assert row["temp_bytes"] > 0 and row["live_rows"] == 2  # lora rank 2; joint's rank 1 + its reserve
    assert rows["joint"]["ratio_of_medians"] == pytest.approx(
        statistics.median(rows["joint"]["times_s"]) / statistics.median(rows["lora"]["times_s"]))
    assert "| joint | 2 |" in proc.stdout
