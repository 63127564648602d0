"""The training command's malloc tuning: when it applies, and that glibc really keeps a freed large block mapped."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from adapad_jax.runtime.host_malloc import OPT_OUT, TUNABLES, tuned_environment

REPO = Path(__file__).resolve().parents[1]


def test_the_tunables_are_added_to_a_plain_glibc_cpu_environment():
    env = tuned_environment({"PATH": "/bin"}, glibc=True, accelerator=False)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": ":".join(TUNABLES)}


def test_tunables_of_other_subsystems_are_kept():
    env = tuned_environment({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=4096"}, glibc=True, accelerator=False)
    assert env["GLIBC_TUNABLES"] == ":".join(["glibc.rtld.optional_static_tls=4096", *TUNABLES])


@pytest.mark.parametrize(
    "environ, glibc, accelerator",
    [
        ({}, False, False),  # musl, macOS
        ({OPT_OUT: "system"}, True, False),
        ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"}, True, False),
        ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, True, False),  # the user's own, or already re-executed
        ({}, True, True),  # a GPU / TPU plugin: the step's buffers live on the device
        ({"JAX_PLATFORMS": "cuda"}, True, True),
    ],
)
def test_the_allocator_is_left_alone(environ, glibc, accelerator):
    assert tuned_environment(environ, glibc=glibc, accelerator=accelerator) is None


def test_a_cpu_run_on_a_machine_with_an_accelerator_plugin_is_tuned():
    assert tuned_environment({"JAX_PLATFORMS": "cpu"}, glibc=True, accelerator=True) is not None


_PROBE = textwrap.dedent("""
    import ctypes, os, resource, sys
    print("before", os.environ.get("GLIBC_TUNABLES"), flush=True)
    from adapad_jax.runtime.host_malloc import reexec_with_tuned_malloc
    reexec_with_tuned_malloc()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 256 << 20
    def fill():  # a step's temporaries: allocated, written, freed
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)
    fill()
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fill()
    print("faults", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start, sys.argv[1:], flush=True)
""")


def _probe(**env: str) -> list[str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD", OPT_OUT)}
    out = subprocess.run([sys.executable, "-c", _PROBE, "--flag", "x"], env={**environ, **env}, cwd=REPO,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return out.split("\n")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables")
def test_the_reexecuted_process_reuses_a_freed_large_block():
    system = _probe(**{OPT_OUT: "system"})
    tuned = _probe()
    assert system[0] == "before None" and system[1].startswith("faults")  # no re-exec
    assert tuned[0] == "before None" and tuned[1] == f"before {':'.join(TUNABLES)}"  # re-executed once, same argv
    system_faults, tuned_faults = int(system[1].split()[1]), int(tuned[2].split()[1])
    assert tuned[2].endswith("['--flag', 'x']")
    if system_faults < 1000:
        pytest.skip(f"this kernel maps the block in {system_faults} faults (huge pages): nothing to compare")
    assert tuned_faults < system_faults / 20, (tuned_faults, system_faults)


_RELEASE_PROBE = textwrap.dedent("""
    import ctypes
    from adapad_jax.runtime.host_malloc import release_free_heap, reexec_with_tuned_malloc
    reexec_with_tuned_malloc()
    def resident_mib():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 256 << 20
    block = libc.malloc(size)  # set-up's garbage: written, then freed
    ctypes.memset(block, 1, size)
    libc.free(block)
    kept = resident_mib()
    print("released", release_free_heap(), kept - resident_mib(), flush=True)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables")
def test_release_free_heap_hands_back_what_the_tunables_keep():
    environ = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD", OPT_OUT)}
    out = subprocess.run([sys.executable, "-c", _RELEASE_PROBE], env=environ, cwd=REPO, capture_output=True,
                         text=True, timeout=60, check=True).stdout.split()
    assert out[:2] == ["released", "True"]
    assert float(out[2]) > 200, f"only {out[2]} MiB of the freed 256 MiB went back to the system"


def test_a_run_releases_set_up_memory_once_before_its_first_step(tmp_path, monkeypatch):
    from adapad_jax.run import core as run_lib
    from adapad_jax.training import Trainer

    sys.path.insert(0, str(REPO / "tests"))
    from test_e2e_runs import tiny_run_config

    config = tiny_run_config(tmp_path, "glue_rte", "deberta")
    config.train.num_steps = 1
    calls = []
    monkeypatch.setattr(run_lib, "release_free_heap", lambda: calls.append("release") or True)
    train = Trainer.train
    monkeypatch.setattr(Trainer, "train", lambda self, *a, **k: calls.append("train") or train(self, *a, **k))
    run_lib.run(config, progress=False, log=lambda _: None)
    assert calls == ["release", "train"]
