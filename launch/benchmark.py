"""Side-by-side speed and memory benchmarks (not tests).

Suites:
  models  forward, and forward+backward with rank-8 adapters on every target, of
          DeBERTaV3-base-size and Qwen3-0.6B-size models (random weights, built
          from configs) in JAX and in transformers/PyTorch (+PEFT) on the same
          input. Both sides stay up in their own processes and are timed in
          alternation (--repeats rounds, who goes first swapped each round),
          so machine noise hits both; min and median of each, ratio of mins.
  slots   AdaPaD train-step time with L = 1, 2, 4, 8 live slots against the
          fixed-rank `lora` step on the same small model; ratios to `lora`.
          One column per `adapter.slot_chunk_size` in --slot_chunks (0: all
          live slots in one vmapped pass; c: c slots at a time under lax.map).
          Timed steps are unlogged ones; --log_every 1 times logged steps,
          where adapad also runs the committed forward (the logged loss);
          --grad_accum_steps N runs each step's batch as N micro-batches.
  step_memory
          compile only: XLA's temporary-buffer bytes of the real train step of
          the DeBERTaV3-base / Qwen3-0.6B size models at the paper's batch
          shapes (GLUE 32 x 128, SQuAD 16 x 384) with L = 8 live slots, per
          `adapter.slot_chunk_size` and `adapter.remat`, against fixed-rank
          `lora` (rank 8). On a CPU host it is the CPU compiler's assignment,
          an estimate of what a GPU needs; XLA:CPU's schedule does not realise
          rematerialisation savings (even for a plain jax.checkpoint MLP), so
          the remat rows only mean something on a GPU.

  scaling component-parallel efficiency across processes: the real AdaPaD
          train step (L live slots, slot_chunk_size 1) as one process
          pinned to one core (mesh.components=1) and as P processes pinned
          to a core each, joined with jax.distributed on 127.0.0.1
          (mesh.components=P), same global batch, and P independent copies
          (the hardware's ceiling); step time, speedup, efficiency
          T1/(P*TP), the collectives' profiled share of the step, CPU
          seconds per step. Toy model of DeBERTaV3-base's width and depth
          unless --shape HIDDEN,LAYERS,BATCH,SEQ; --quick: a tiny model.

  gpu     on a GPU machine: JAX lora train step vs PyTorch+PEFT LoRA step
          (DeBERTaV3-base 32x128 fp32 and bf16, Qwen3-0.6B 16x384 bf16),
          MFU, peak memory; adapad step time for L = 1, 2, 4, 8 with
          slot_chunk_size 1/0 and remat off/on, on one GPU and on all
          visible GPUs (mesh.components = #GPUs). Markdown + JSON. Exits at
          once with one line where no GPU is visible.

  methods every adapter.method's train step against lora's on the same model
          and batch (toy by default, --method_model for a random-weights
          DeBERTaV3-base / Qwen3-0.6B), each method in its own process,
          timed in alternating rounds (one step each, order rotated every
          round): step time, XLA's compiled temporaries and peak memory,
          ratios to lora. A method that cannot start (not wired into the
          trainer yet) is reported as not available.

Every measurement runs in its own subprocess, so peak memory (GPU allocator peak
when a GPU is present, else peak process RSS) belongs to that measurement alone.

  python launch/benchmark.py --suite models --batch 4 --seq 128
  python launch/benchmark.py --suite slots
  python launch/benchmark.py --suite step_memory
  python launch/benchmark.py --suite methods --repeats 30
  python launch/benchmark.py --suite scaling --processes 2 --out scaling.json
  python launch/benchmark.py --suite gpu --out gpu.json   # writes gpu.md too; one GPU, < 8 min
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MODEL_SPECS = {
    # DeBERTaV3-base (microsoft/deberta-v3-base config), sequence classification.
    "deberta-v3-base": dict(
        model_type="deberta-v2",
        task="classification",
        config=dict(
            vocab_size=128100, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
            intermediate_size=3072, hidden_act="gelu", max_position_embeddings=512, type_vocab_size=0,
            relative_attention=True, position_buckets=256, norm_rel_ebd="layer_norm", share_att_key=True,
            pos_att_type=["p2c", "c2p"], position_biased_input=False, max_relative_positions=-1,
            layer_norm_eps=1e-7, num_labels=2,
        ),
        train_shape=(32, 128),  # GLUE batch x max length
    ),
    # Qwen3-0.6B (Qwen/Qwen3-0.6B config), span QA head as in the paper.
    "qwen3-0.6b": dict(
        model_type="qwen3",
        task="qa",
        config=dict(
            vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
            num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
            rms_norm_eps=1e-6, max_position_embeddings=40960,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, num_labels=2,
        ),
        train_shape=(16, 384),  # SQuAD batch x max length
        dtype="bfloat16",  # the SQuAD configs' compute dtype
    ),
}
ADAPTER_RANK = 8


def _hf_config(name: str):
    from transformers import AutoConfig

    spec = MODEL_SPECS[name]
    return AutoConfig.for_model(spec["model_type"], **spec["config"])


def _resident_mib() -> float | None:
    """This process's resident memory now (Linux), as opposed to its peak."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def _peak_memory_mib(framework: str) -> float:
    if framework == "jax":
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            return stats["peak_bytes_in_use"] / 2**20
    else:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _time(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _jax_model_setup(name: str, mode: str, batch: int, seq: int):
    """A no-argument callable running one JAX forward (fwd) or forward+backward (fwd_bwd), blocking."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import traverse_util

    from adapad_jax.models.registry import model_from_config

    spec = MODEL_SPECS[name]
    dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    model = model_from_config(_hf_config(name), task=spec["task"], num_labels=2, dtype=dtype)
    rng = np.random.default_rng(0)
    inputs = {
        "input_ids": jnp.asarray(rng.integers(5, 1000, size=(batch, seq)), jnp.int32),
        "attention_mask": jnp.ones((batch, seq), jnp.int32),
    }
    lora = traverse_util.unflatten_dict(
        {
            t.flax_path + (k,): v
            for t in model.targets
            for k, v in {
                "a": jnp.asarray(rng.normal(0, 0.02, (ADAPTER_RANK, t.in_features)), jnp.float32),
                "b": jnp.asarray(rng.normal(0, 0.02, (ADAPTER_RANK, t.out_features)), jnp.float32),
                "coef": jnp.full((ADAPTER_RANK,), 2.0, jnp.float32),
            }.items()
        }
    )

    module = model.module

    def forward(params, lora):
        out = module.apply({"params": params, "lora": lora}, **inputs, deterministic=True)
        return sum(jnp.sum(jnp.square(v.astype(jnp.float32))) for v in out.values())

    # The weights live on the device once, as PyTorch's live in its model: the host copy is dropped (it would
    # double the resident size on a CPU), and nothing is converted per call.
    params = jax.tree.map(lambda x: jax.device_put(x).copy(), model.params)
    del model
    if mode == "fwd":
        fn = jax.jit(lambda p: module.apply({"params": p}, **inputs, deterministic=True))
        return lambda: jax.block_until_ready(fn(params))  # noqa: E731
    grad_fn = jax.jit(jax.grad(forward, argnums=1))
    return lambda: jax.block_until_ready(grad_fn(params, lora))  # noqa: E731


def _jax_model_worker(name: str, mode: str, batch: int, seq: int, repeats: int) -> dict:
    run = _jax_model_setup(name, mode, batch, seq)
    compile_start = time.perf_counter()
    run()
    compile_s = time.perf_counter() - compile_start
    times = _time(run, repeats)
    return {"median_s": statistics.median(times), "first_call_s": compile_s, "peak_mib": _peak_memory_mib("jax")}


def _torch_model_setup(name: str, mode: str, batch: int, seq: int):
    """A no-argument callable running one PyTorch forward or forward+backward with PEFT LoRA, synchronised."""
    import numpy as np
    import torch
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    spec = MODEL_SPECS[name]
    torch.manual_seed(0)
    cls = AutoModelForQuestionAnswering if spec["task"] == "qa" else AutoModelForSequenceClassification
    model = cls.from_config(_hf_config(name)).eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        model = model.to(device, dtype=torch.bfloat16)
    rng = np.random.default_rng(0)
    inputs = {
        "input_ids": torch.tensor(rng.integers(5, 1000, size=(batch, seq)), device=device),
        "attention_mask": torch.ones((batch, seq), dtype=torch.long, device=device),
    }
    if mode == "fwd":

        def run():
            with torch.no_grad():
                model(**inputs)
            if device == "cuda":
                torch.cuda.synchronize()

    else:
        from peft import LoraConfig, get_peft_model

        targets = (
            ["query_proj", "key_proj", "value_proj", "attention.output.dense", "intermediate.dense", "output.dense"]
            if spec["model_type"] == "deberta-v2"
            else ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        )
        peft_model = get_peft_model(model, LoraConfig(r=ADAPTER_RANK, lora_alpha=16, target_modules=targets))

        def run():
            peft_model.zero_grad(set_to_none=True)
            out = peft_model(**inputs)
            loss = sum((v.float() ** 2).sum() for k, v in out.items() if k.endswith("logits"))
            loss.backward()
            if device == "cuda":
                torch.cuda.synchronize()

    return run


def _torch_model_worker(name: str, mode: str, batch: int, seq: int, repeats: int) -> dict:
    run = _torch_model_setup(name, mode, batch, seq)
    compile_start = time.perf_counter()
    run()
    first = time.perf_counter() - compile_start
    times = _time(run, repeats)
    return {"median_s": statistics.median(times), "first_call_s": first, "peak_mib": _peak_memory_mib("torch")}


def _serve(fw: str, name: str, mode: str, batch: int, seq: int) -> None:
    """Persistent worker for the alternating models suite: set up and warm up, then answer stdin lines
    ``run`` (time one call) and ``peak`` (peak memory so far) with one JSON line each, until ``quit``."""
    core = os.environ.get("ADAPAD_BENCH_CORE", "")
    if core:  # both sides on the same single core, one thread each: no thread-pool oversubscription on a busy host
        os.sched_setaffinity(0, {int(core)})
        if fw == "torch":
            import torch

            torch.set_num_threads(1)
    setup = _jax_model_setup if fw == "jax" else _torch_model_setup
    run = setup(name, mode, batch, seq)
    from adapad_jax.runtime.host_malloc import release_free_heap

    release_free_heap()  # as adapad-train does before its first step; both sides alike
    start = time.perf_counter()
    run()
    print(json.dumps({"ready": True, "first_call_s": time.perf_counter() - start}), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "run":
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            run()
            print(json.dumps({"s": time.perf_counter() - start,
                              "page_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults}), flush=True)
        elif command == "peak":
            print(json.dumps({"peak_mib": _peak_memory_mib(fw), "resident_mib": _resident_mib()}), flush=True)
        else:
            return


def _serve_method(method: str, name: str, batch: int, seq: int) -> None:
    """Persistent worker of the methods suite: one method's trainer on the suite's model and batches; answers
    ``run`` (time one step) and ``peak`` like ``_serve``. Exits with the trainer's error line when the method
    cannot start (the suite reports it as not available)."""
    import tempfile

    from adapad_jax.runtime.host_malloc import release_free_heap
    from adapad_jax.studies.benchmarking import MethodStep, random_batch, toy_methods_model

    if name == "toy":
        model, batches = toy_methods_model(batch, seq)
    else:
        import jax.numpy as jnp

        from adapad_jax.models.registry import model_from_config

        spec = MODEL_SPECS[name]
        dtype = jnp.bfloat16 if spec.get("dtype") == "bfloat16" else jnp.float32
        model = model_from_config(_hf_config(name), task=spec["task"], num_labels=2, dtype=dtype)
        batches = [random_batch(model, batch, seq, seed) for seed in range(4)]
    with tempfile.TemporaryDirectory() as out:
        try:
            step = MethodStep(model, method, batches, out)
        except Exception as err:  # noqa: BLE001 - reported as "not available", one line
            sys.exit(f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}")
        release_free_heap()
        first = step.run()
        step.run()  # a second warm-up: donation and caches settle
        print(json.dumps({"ready": True, "first_call_s": first, "temp_bytes": step.temp_bytes,
                          "live_rows": step.live_rows}), flush=True)
        for line in sys.stdin:
            command = line.strip()
            if command == "run":
                print(json.dumps({"s": step.run(), "page_faults": 0}), flush=True)
            elif command == "peak":
                print(json.dumps({"peak_mib": _peak_memory_mib("jax"), "resident_mib": _resident_mib()}), flush=True)
            else:
                break
        step.close()


METHODS = ("lora", "adapad", "joint", "adalora", "increlora", "sora", "ardlora")
JOINT_LIMIT = 1.3  # issue 20: a jointly trained method should cost at most this many lora steps


def suite_methods(args) -> list[dict]:
    """Every method's train step against lora's on the same model and batch, timed in alternating rounds."""
    methods = ["lora"] + [m for m in args.methods.split(",") if m and m != "lora"]
    servers, rows, missing = {}, [], {}
    try:
        for method in methods:  # set up one after the other so compiles do not overlap
            server = _Server("jax", args.method_model, "fwd", args.batch, args.seq, args.timeout,
                             worker=["serve_method", method, args.method_model, str(args.batch), str(args.seq)])
            try:
                server.ready = server.ask()
                servers[method] = server
            except RuntimeError as err:
                missing[method] = str(err)
        if "lora" not in servers:
            raise SystemExit(f"error: the lora step did not start: {missing.get('lora')}")
        times, _ = alternate_rounds(servers, args.repeats, rotate=True)
        memory = {method: server.ask("peak") for method, server in servers.items()}
    finally:
        for server in servers.values():
            server.close()
    base_min, base_median = min(times["lora"]), statistics.median(times["lora"])
    base_temp, base_peak = servers["lora"].ready["temp_bytes"], memory["lora"]["peak_mib"]
    for method in methods:
        if method in missing:
            rows.append({"method": method, "available": False, "reason": missing[method]})
            print(f"| {method} | not available ({missing[method]}) | | | | | | | |", flush=True)
            continue
        t, ready = times[method], servers[method].ready
        row = {"method": method, "available": True, "min_s": min(t), "median_s": statistics.median(t),
               "mean_s": statistics.fmean(t), "times_s": t, "first_call_s": ready["first_call_s"],
               "live_rows": ready["live_rows"], "temp_bytes": ready["temp_bytes"],
               "peak_mib": memory[method]["peak_mib"]}
        row["ratio_of_medians"] = row["median_s"] / base_median
        row["ratio_of_mins"] = row["min_s"] / base_min
        row["temp_ratio"] = row["temp_bytes"] / base_temp if base_temp else None
        row["peak_ratio"] = row["peak_mib"] / base_peak
        rows.append(row)
        flag = " (> 1.3)" if method not in ("lora", "adapad") and row["ratio_of_medians"] > JOINT_LIMIT else ""
        temp_ratio = "n/a" if row["temp_ratio"] is None else f"{row['temp_ratio']:.2f}"
        print(f"| {method} | {row['live_rows']} | {1e3 * row['min_s']:.2f} / {1e3 * row['median_s']:.2f} / "
              f"{1e3 * row['mean_s']:.2f} ms | **{row['ratio_of_medians']:.2f}**{flag} | {row['ratio_of_mins']:.2f} | "
              f"{row['temp_bytes'] / 2**20:.1f} MiB | {temp_ratio} | {row['peak_mib']:.0f} MiB | "
              f"{row['peak_ratio']:.2f} |", flush=True)
    return rows


def _slots_worker(method: str, live_slots: int, repeats: int, slot_chunk_size: int, log_every: int,
                  grad_accum_steps: int) -> dict:
    from adapad_jax.studies.benchmarking import time_train_step

    return time_train_step(method=method, live_slots=live_slots, repeats=repeats, slot_chunk_size=slot_chunk_size,
                           log_every=log_every, grad_accum_steps=grad_accum_steps)


def _memory_worker(name: str, method: str, live: int, chunk: int, remat: bool, batch: int, seq: int) -> dict:
    import jax.numpy as jnp

    from adapad_jax.models.registry import model_from_config
    from adapad_jax.studies.benchmarking import step_memory

    spec = MODEL_SPECS[name]
    dtype = jnp.bfloat16 if spec.get("dtype") == "bfloat16" else jnp.float32
    model = model_from_config(_hf_config(name), task=spec["task"], num_labels=2, dtype=dtype)
    return step_memory(model, method=method, live_slots=live, batch_size=batch, seq_len=seq,
                       slot_chunk_size=chunk, remat=remat)


MEMORY_VARIANTS = (  # (method, slot_chunk_size, remat)
    ("lora", 0, False), ("lora", 0, True), ("adapad", 0, False), ("adapad", 2, False), ("adapad", 1, False),
    ("adapad", 0, True), ("adapad", 1, True),
)


def suite_step_memory(args) -> list[dict]:
    rows = []
    for name in args.models.split(","):
        batch, seq = (args.batch, args.seq) if args.batch and args.seq else MODEL_SPECS[name]["train_shape"]
        base = None
        for method, chunk, remat in MEMORY_VARIANTS:
            res = _run_worker(["memory", name, method, "8", str(chunk), str(int(remat)), str(batch), str(seq)])
            rows.append({"model": name, "method": method, "batch": batch, "seq": seq, **res})
            if method == "lora" and not remat:
                base = res
            gib = res["temp_bytes"] / 2**30 if "temp_bytes" in res else None
            ratio = res["temp_bytes"] / base["temp_bytes"] if gib is not None and "temp_bytes" in base else None
            label = "lora (rank 8)" if method == "lora" else "adapad (L = 8)"
            print(f"| {name} | {batch} x {seq} | {label} | {chunk or 'all'} | {'yes' if remat else 'no'} | "
                  f"{'n/a' if gib is None else f'{gib:.1f} GiB'} | {'n/a' if ratio is None else f'{ratio:.2f}'} |"
                  + (f" error: {res['error']}" if "error" in res else ""), flush=True)
    return rows


def _run_worker(args: list[str], timeout: float | None = None) -> dict:
    cmd = [sys.executable, __file__, "--_worker", *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt(x: float | None, unit: str = "") -> str:
    return "n/a" if x is None else f"{x:.3f}{unit}" if unit == "s" else f"{x:.0f}{unit}"


class _Server:
    """One persistent ``_serve`` worker process (JAX or PyTorch side of a models row); every read is bounded."""

    def __init__(self, fw: str, name: str, mode: str, batch: int, seq: int, timeout_s: float, core: int = -1,
                 preload: str = "", malloc: str = "tuned", worker: list[str] | None = None):
        """``worker``: the worker's arguments (default: a models-suite side, ``serve fw name mode batch seq``)."""
        from adapad_jax.runtime.host_malloc import OPT_OUT, cpu_worker_environment

        self.timeout_s = timeout_s
        env = {**os.environ, "PYTHONPATH": str(ROOT), "ADAPAD_BENCH_CORE": "" if core < 0 else str(core)}
        if preload:
            env["LD_PRELOAD"] = preload
        if malloc == "tuned":  # what adapad-train runs under (adapad_jax/runtime/host_malloc.py)
            env = cpu_worker_environment(env)
        else:
            env = {**env, OPT_OUT: "system"}
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--_worker",
             *(worker or ["serve", fw, name, mode, str(batch), str(seq)])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )

    def ask(self, command: str | None = None) -> dict:
        import select

        if command is not None:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout_s)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.close()
            err = (self.proc.stderr.read().strip().splitlines() or ["no answer within the timeout"])[-1]
            raise RuntimeError(err)
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def alternate_rounds(servers: dict, rounds: int, rotate: bool = False
                     ) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Time one call per side per round, swapping which side goes first every round (``rotate``: round i starts
    at side i mod n, for more than two sides).

    Returns the seconds and the minor page faults of each call, per side.
    """
    times: dict[str, list[float]] = {fw: [] for fw in servers}
    faults: dict[str, list[int]] = {fw: [] for fw in servers}
    order = list(servers)
    for index in range(rounds):
        if rotate:
            shift = index % len(order)
            this_round = order[shift:] + order[:shift]
        else:
            this_round = order if index % 2 == 0 else order[::-1]
        for fw in this_round:
            answer = servers[fw].ask("run")
            times[fw].append(answer["s"])
            faults[fw].append(answer["page_faults"])
    return times, faults


def suite_models(args) -> list[dict]:
    rows = []
    for name in args.models.split(","):
        for mode in ("fwd", "fwd_bwd"):
            servers = {}
            try:
                for fw in ("jax", "torch"):  # set up one after the other so compiles do not overlap
                    servers[fw] = _Server(fw, name, mode, args.batch, args.seq, args.timeout, args.pin_core,
                                          args.preload, args.malloc)
                    servers[fw].first = servers[fw].ask()["first_call_s"]
                times, faults = alternate_rounds(servers, args.repeats)
                memory = {fw: server.ask("peak") for fw, server in servers.items()}
                error = None
            except RuntimeError as err:
                times, faults, memory, error = {}, {}, {}, str(err)
            finally:
                for server in servers.values():
                    server.close()
            row = {"model": name, "mode": mode, "batch": args.batch, "seq": args.seq, "rounds": args.repeats}
            if error:
                row["error"] = error
                print(f"| {name} | {mode} | error: {error} |", flush=True)
                rows.append(row)
                continue
            for fw in ("jax", "torch"):
                row[fw] = {"min_s": min(times[fw]), "median_s": statistics.median(times[fw]), "times_s": times[fw],
                           "first_call_s": servers[fw].first, "peak_mib": memory[fw]["peak_mib"],
                           "resident_mib": memory[fw].get("resident_mib"),
                           "page_faults_per_call": statistics.median(faults[fw])}
            j, t = row["jax"], row["torch"]
            row["ratio_of_mins"] = j["min_s"] / t["min_s"]
            row["ratio_of_medians"] = j["median_s"] / t["median_s"]
            row["mem_ratio"] = j["peak_mib"] / t["peak_mib"]
            rows.append(row)
            print(f"| {name} | {mode} | {j['min_s']:.3f} / {j['median_s']:.3f} s | {t['min_s']:.3f} / "
                  f"{t['median_s']:.3f} s | **{row['ratio_of_mins']:.2f}** | {row['ratio_of_medians']:.2f} | "
                  f"{j['peak_mib']:.0f} MiB | {t['peak_mib']:.0f} MiB | {row['mem_ratio']:.2f} | "
                  f"{j['page_faults_per_call']:.0f} / {t['page_faults_per_call']:.0f} | "
                  f"{_fmt(j['resident_mib'], ' MiB')} / {_fmt(t['resident_mib'], ' MiB')} |", flush=True)
    return rows


def _slot_chunks(text: str) -> list[int]:
    try:
        chunks = [int(c) for c in text.split(",")]
    except ValueError:
        chunks = []
    if not chunks or any(c < 0 for c in chunks):
        raise SystemExit(f"--slot_chunks must be comma-separated integers >= 0, got {text!r}")
    return chunks


def suite_slots(args, chunks: list[int]) -> list[dict]:
    rows = []
    base = _run_worker(["slots", "lora", "1", str(args.repeats), "0", str(args.log_every), str(args.grad_accum_steps)])
    rows.append({"method": "lora", "live_slots": 1, **base})
    cells = " | ".join(f"{_fmt(base.get('median_s'), 's')} (1.00)" for _ in chunks)
    print(f"| lora (rank 1) | 1 | {cells} |", flush=True)
    for live in (1, 2, 4, 8):
        cells = []
        for chunk in chunks:
            res = _run_worker(["slots", "adapad", str(live), str(args.repeats), str(chunk), str(args.log_every),
                               str(args.grad_accum_steps)])
            rows.append({"method": "adapad", "live_slots": live, **res})
            ratio = res["median_s"] / base["median_s"] if "median_s" in res and "median_s" in base else None
            cells.append(f"{_fmt(res.get('median_s'), 's')} ({'n/a' if ratio is None else f'{ratio:.2f}'})"
                         + (f" error: {res['error']}" if "error" in res else ""))
        print(f"| adapad | {live} | {' | '.join(cells)} |", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------- gpu suite

# Dense peak FLOP/s per device kind: (bf16 tensor cores, fp32 matmuls as JAX/PyTorch run them by default).
PEAK_FLOPS = {"H200": (989e12, 494e12), "H100": (989e12, 494e12), "A100": (312e12, 156e12), "L40S": (362e12, 183e12),
              "L4": (121e12, 60e12), "A10": (125e12, 62.5e12), "V100": (125e12, 15.7e12)}
GPU_LORA_ROWS = (("deberta-v3-base", "float32"), ("deberta-v3-base", "bfloat16"), ("qwen3-0.6b", "bfloat16"))


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """The device's dense peak FLOP/s for ``dtype`` (None for an unknown device)."""
    for name, (bf16, fp32) in PEAK_FLOPS.items():
        if name.lower() in device_kind.lower():
            return bf16 if dtype == "bfloat16" else fp32
    return None


def _jax_model(name: str, dtype: str):
    import jax.numpy as jnp

    from adapad_jax.models.registry import model_from_config

    spec = MODEL_SPECS[name]
    return model_from_config(_hf_config(name), task=spec["task"], num_labels=2,
                             dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)


def _gpu_jax_lora_worker(name: str, dtype: str, batch: int, seq: int, repeats: int) -> dict:
    from adapad_jax.studies.benchmarking import time_real_step

    result = time_real_step(_jax_model(name, dtype), "lora", 8, batch, seq, repeats=repeats)
    return {**result, "peak_mib": _peak_memory_mib("jax")}


def _gpu_torch_lora_worker(name: str, dtype: str, batch: int, seq: int, repeats: int) -> dict:
    """PEFT LoRA rank 8 (alpha 16) on the same targets plus a trained head, AdamW, the task's loss."""
    import contextlib

    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    if not torch.cuda.is_available():
        raise RuntimeError("PyTorch sees no CUDA device (install a CUDA build of torch for this row)")
    spec = MODEL_SPECS[name]
    torch.manual_seed(0)
    qa = spec["task"] == "qa"
    cls = AutoModelForQuestionAnswering if qa else AutoModelForSequenceClassification
    model = cls.from_config(_hf_config(name)).cuda()
    targets = (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] if qa else
               ["query_proj", "key_proj", "value_proj", "attention.output.dense", "intermediate.dense", "output.dense"])
    peft_model = get_peft_model(model, LoraConfig(r=ADAPTER_RANK, lora_alpha=16, target_modules=targets,
                                                  modules_to_save=["qa_outputs"] if qa else ["classifier"]))
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    rng = np.random.default_rng(0)
    inputs = {"input_ids": torch.tensor(rng.integers(5, 1000, size=(batch, seq)), device="cuda"),
              "attention_mask": torch.ones((batch, seq), dtype=torch.long, device="cuda")}
    if qa:
        positions = torch.tensor(rng.integers(0, seq, size=(batch,)), device="cuda")
        inputs.update(start_positions=positions, end_positions=positions)
    else:
        inputs["labels"] = torch.tensor(rng.integers(0, 2, size=(batch,)), device="cuda")
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext())

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = peft_model(**inputs).loss
        loss.backward()
        optimizer.step()
        torch.cuda.synchronize()

    step()
    times = _time(step, repeats)
    return {"median_s": statistics.median(times), "min_s": min(times), "peak_mib": _peak_memory_mib("torch")}


def _gpu_adapad_worker(name: str, dtype: str, batch: int, seq: int, components: int, repeats: int,
                       deadline: float) -> list[dict]:
    """adapad step for L = 1, 2, 4, 8 x slot_chunk_size 0/1 x remat off/on in one process, until ``deadline``."""
    from adapad_jax.studies.benchmarking import time_real_step

    model = _jax_model(name, dtype)
    rows = []
    for remat in (False, True):
        for chunk in (1, 0):
            for live in (1, 2, 4, 8):
                cell = {"live_slots": live, "slot_chunk_size": chunk, "remat": remat, "components": components}
                if time.time() > deadline:
                    rows.append({**cell, "skipped": "time budget"})
                    continue
                try:
                    rows.append({**cell, **time_real_step(model, "adapad", live, batch, seq, slot_chunk_size=chunk,
                                                          remat=remat, components=components, repeats=repeats)})
                except Exception as err:  # noqa: BLE001 - an out-of-memory cell is a result, not a crash
                    rows.append({**cell, "error": str(err).strip().splitlines()[0][:200]})
    return rows


def visible_gpus() -> int:
    """Number of GPUs JAX sees (0 when its GPU backend is missing)."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave the memory to the workers
    import jax

    try:
        return len(jax.devices("gpu"))
    except RuntimeError:
        return 0


def suite_gpu(args) -> dict:
    gpus = visible_gpus()
    if gpus == 0:
        raise SystemExit("error: --suite gpu needs a GPU visible to JAX and none is (JAX backend: cpu); install the "
                         "CUDA build (pip install \"jax[cuda12]\") on a GPU machine and rerun")
    start = time.time()
    deadline = start + args.budget
    lines, result = [], {"gpus": gpus, "lora": [], "adapad": []}

    def emit(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    emit(f"## GPU benchmark ({time.strftime('%Y-%m-%d %H:%M')}, {gpus} GPU(s))")
    emit()
    emit("Train step: JAX `lora` (rank 8, all targets, AdamW, head trained) vs PyTorch+PEFT LoRA (same); median of "
         f"{args.repeats} after a warm-up; MFU = XLA's FLOP count of the JAX step / time / device peak.")
    emit()
    emit("| model | dtype | batch x seq | JAX step | PyTorch step | JAX/PyTorch | JAX MFU | PyTorch MFU | JAX peak | "
         "PyTorch peak |")
    emit("|---|---|---|---|---|---|---|---|---|---|")
    for name, dtype in GPU_LORA_ROWS:
        batch, seq = MODEL_SPECS[name]["train_shape"]
        j = _run_worker(["gpu_jax_lora", name, dtype, str(batch), str(seq), str(args.repeats)], timeout=300)
        t = _run_worker(["gpu_torch_lora", name, dtype, str(batch), str(seq), str(args.repeats)], timeout=300)
        result["lora"].append({"model": name, "dtype": dtype, "batch": batch, "seq": seq, "jax": j, "torch": t})
        peak = peak_flops(j.get("device", ""), dtype)
        flops = j.get("flops") or None
        mfu = {k: (flops / r["median_s"] / peak if flops and peak and "median_s" in r else None)
               for k, r in (("jax", j), ("torch", t))}
        ratio = j["median_s"] / t["median_s"] if "median_s" in j and "median_s" in t else None
        emit(f"| {name} | {dtype} | {batch} x {seq} | {_fmt(j.get('median_s'), 's')} | {_fmt(t.get('median_s'), 's')} "
             f"| {'n/a' if ratio is None else f'{ratio:.2f}'} | "
             + " | ".join("n/a" if mfu[k] is None else f"{mfu[k]:.1%}" for k in ("jax", "torch"))
             + f" | {_fmt(j.get('peak_mib'), ' MiB')} | {_fmt(t.get('peak_mib'), ' MiB')} |"
             + "".join(f" {k} error: {r['error']}" for k, r in (("jax", j), ("torch", t)) if "error" in r))
    name, dtype = "deberta-v3-base", "float32"
    batch, seq = MODEL_SPECS[name]["train_shape"]
    for components in sorted({1, gpus}):
        emit()
        emit(f"adapad train step, {name} {dtype} {batch} x {seq}, mesh.components = {components} "
             f"({components} GPU(s)); compiled temporaries from XLA's buffer assignment")
        emit()
        emit("| remat | slot chunk | L = 1 | L = 2 | L = 4 | L = 8 |")
        emit("|---|---|---|---|---|---|")
        remaining = deadline if components == gpus else start + args.budget * (0.75 if gpus > 1 else 1.0)
        rows = _run_worker(["gpu_adapad", name, dtype, str(batch), str(seq), str(components), str(args.repeats),
                            str(remaining)], timeout=max(remaining - time.time(), 0) + 240)
        rows = rows if isinstance(rows, list) else [{"error": rows.get("error", "failed")}]
        result["adapad"].extend(rows)
        for remat in (False, True):
            for chunk in (1, 0):
                cells = []
                for live in (1, 2, 4, 8):
                    row = next((r for r in rows if r.get("live_slots") == live and r.get("slot_chunk_size") == chunk
                                and r.get("remat") == remat), rows[0] if "error" in rows[0] else {})
                    if "median_s" in row:
                        cells.append(f"{row['median_s']:.3f} s, {row['temp_bytes'] / 2**30:.1f} GiB")
                    else:
                        cells.append(row.get("skipped") or f"error: {row.get('error', 'missing')}"[:60])
                emit(f"| {'on' if remat else 'off'} | {chunk or 'all'} | " + " | ".join(cells) + " |")
    emit()
    emit(f"total {time.time() - start:.0f} s")
    result["markdown"] = "\n".join(lines)
    out = Path(args.out or "gpu_benchmark.json")
    out.with_suffix(".md").write_text(result["markdown"] + "\n")
    print(f"wrote {out.with_suffix('.md')} and {out}")
    args.out = str(out)
    return result



def load_average() -> str:
    """The 1/5/15-minute load averages and the core count, to print beside every table."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


def suite_scaling(args) -> dict:
    from adapad_jax.studies import scaling
    counts = sorted({int(c) for c in args.processes.split(",")})
    size = scaling.QUICK_SIZE if args.quick else (scaling.parse_shape(args.shape) if args.shape
                                                   else scaling.DEFAULT_SIZE)
    print(f"toy model hidden {size['hidden']} x {size['num_layers']} layers, batch {size['batch_size']} x "
          f"{size['seq_len']}, adapad L = {args.live_slots}, slot_chunk_size 1; median of {args.repeats} steps, "
          f"best of {args.rounds} alternating rounds; {load_average()} before")
    try:
        result = scaling.run_scaling(counts, live_slots=args.live_slots, repeats=args.repeats, rounds=args.rounds,
                                     size=size, timeout_s=args.timeout)
    except (RuntimeError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    print("| processes (cores) | step | speedup | efficiency T1/(P TP) | per round (median) | ceiling (P independent copies) "
          "| efficiency / ceiling | collectives / step | bytes | at a sync only | in collectives (profiled) | "
          "share of step | CPU s / step (all processes) | page faults / step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in result["rows"]:
        spread = row["round_efficiencies"]
        print(f"| {row['processes']} | {row['step_s']:.3f} s | {row['speedup']:.2f} | {row['efficiency']:.2f} | "
              f"{min(spread):.2f}–{max(spread):.2f} ({statistics.median(spread):.2f}) | "
              f"{row['ceiling']:.2f} | {row['of_ceiling']:.2f} | "
              f"{row['collectives_per_step']} | {row['collective_bytes'] / 2**20:.2f} MiB | "
              f"{row['sync_collectives']} ({row['sync_collective_bytes'] / 2**20:.2f} MiB) | "
              f"{row['comm_s'] * 1e3:.1f} ms | {row['comm_share']:.1%} | {row['cpu_s']:.2f} | "
              f"{row['page_faults']:.0f} |", flush=True)
    print(f"{load_average()} after")
    result["load_after"] = os.getloadavg()
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_worker":
        kind, *rest = sys.argv[2:]
        if kind == "memory":
            name, method, live, chunk, remat, batch, seq = rest
            result = _memory_worker(name, method, int(live), int(chunk), bool(int(remat)), int(batch), int(seq))
        elif kind == "gpu_jax_lora":
            name, dtype, batch, seq, repeats = rest
            result = _gpu_jax_lora_worker(name, dtype, int(batch), int(seq), int(repeats))
        elif kind == "gpu_torch_lora":
            name, dtype, batch, seq, repeats = rest
            result = _gpu_torch_lora_worker(name, dtype, int(batch), int(seq), int(repeats))
        elif kind == "gpu_adapad":
            name, dtype, batch, seq, components, repeats, deadline = rest
            result = _gpu_adapad_worker(name, dtype, int(batch), int(seq), int(components), int(repeats),
                                        float(deadline))
        elif kind == "serve_method":
            method, name, batch, seq = rest
            _serve_method(method, name, int(batch), int(seq))
            return
        elif kind == "serve":
            fw, name, mode, batch, seq = rest
            _serve(fw, name, mode, int(batch), int(seq))
            return
        elif kind == "models":
            fw, name, mode, batch, seq, repeats = rest
            worker = _jax_model_worker if fw == "jax" else _torch_model_worker
            result = worker(name, mode, int(batch), int(seq), int(repeats))
        else:
            method, live, repeats, chunk, log_every, accum = rest
            result = _slots_worker(method, int(live), int(repeats), int(chunk), int(log_every), int(accum))
        print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["models", "slots", "step_memory", "scaling", "gpu", "methods"],
                        default="models")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"methods suite: the methods timed against lora (default all: {','.join(METHODS)})")
    parser.add_argument("--method_model", default="toy", choices=["toy", *MODEL_SPECS],
                        help="methods suite: the model (toy: hidden 256, 2 blocks; or a random-weights model)")
    parser.add_argument("--models", default=",".join(MODEL_SPECS))
    parser.add_argument("--batch", type=int, default=0, help="models: default 4; step_memory: the paper's shape")
    parser.add_argument("--seq", type=int, default=0, help="models: default 128; step_memory: the paper's shape")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls (models: alternating rounds, >= 1)")
    parser.add_argument("--slot_chunks", default="0,1",
                        help="slots suite: adapter.slot_chunk_size values, one column each (default 0,1)")
    parser.add_argument("--log_every", type=int, default=10,
                        help="slots: train.log_every_steps (default 10: the timed steps are unlogged ones; 1: every "
                             "step logged, so adapad also runs the committed forward)")
    parser.add_argument("--grad_accum_steps", type=int, default=1,
                        help="slots: train.grad_accum_steps (micro-batches per step of the same 512-row batch)")
    parser.add_argument("--out", default="", help="also write the rows as JSON here")
    parser.add_argument("--processes", default="2", help="scaling: process counts P to compare with 1 (e.g. 2)")
    parser.add_argument("--live_slots", type=int, default=4, help="scaling: live slots L (a multiple of each P)")
    parser.add_argument("--rounds", type=int, default=2, help="scaling: alternating rounds; the best is kept")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="scaling, models: seconds a worker may take for one answer before it is killed")
    parser.add_argument("--quick", action="store_true", help="scaling: a tiny model, for a smoke test")
    parser.add_argument("--shape", default="",
                        help="scaling: toy model HIDDEN,LAYERS,BATCH,SEQ (default 768,12,128,16: DeBERTaV3-base's "
                             "width and depth)")
    parser.add_argument("--pin_core", type=int, default=-1,
                        help="models: run both sides on this one core with one thread each (default: all cores)")
    parser.add_argument("--budget", type=float, default=420.0,
                        help="gpu: seconds after which the adapad grid skips its remaining cells")
    parser.add_argument("--preload", default="",
                        help="models: a shared library preloaded (LD_PRELOAD) into both sides' workers, e.g. "
                             "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
    parser.add_argument("--malloc", choices=["tuned", "system"], default="tuned",
                        help="models: both sides under the glibc malloc settings adapad-train uses (tuned, default; "
                             "adapad_jax/runtime/host_malloc.py) or glibc's defaults (system)")
    args = parser.parse_args()
    unknown = set(args.models.split(",")) - set(MODEL_SPECS)
    if unknown:
        parser.error(f"unknown model(s) {sorted(unknown)}; choose from {sorted(MODEL_SPECS)}")
    if args.log_every < 1:
        parser.error(f"--log_every must be >= 1, got {args.log_every}")
    if args.grad_accum_steps < 1 or 512 % args.grad_accum_steps:
        parser.error(f"--grad_accum_steps must divide the slots suite's batch of 512, got {args.grad_accum_steps}")
    if args.preload and not Path(args.preload).is_file():
        parser.error(f"--preload {args.preload}: no such file")
    if args.shape:
        from adapad_jax.studies.scaling import parse_shape

        try:
            parse_shape(args.shape)
        except ValueError as err:
            parser.error(str(err))
    if args.suite == "gpu":
        rows = suite_gpu(args)
    elif args.suite == "scaling":
        rows = suite_scaling(args)
    elif args.suite == "models":
        args.batch, args.seq = args.batch or 4, args.seq or 128
        pinned = f"both pinned to core {args.pin_core}, one thread each" if args.pin_core >= 0 else "all cores"
        if args.preload:
            pinned += f"; both with LD_PRELOAD={args.preload}"
        pinned += f"; malloc {args.malloc}"
        print(f"batch {args.batch} x seq {args.seq}; {args.repeats} rounds alternating JAX and PyTorch (one call each, "
              f"order swapped every round) after a warm-up call; {pinned}; {load_average()} before")
        print("| model | mode | JAX min / median | PyTorch min / median | JAX/PyTorch (mins) | (medians) | JAX peak | "
              "PyTorch peak | JAX/PyTorch mem | page faults per call (JAX / PyTorch) | resident after the calls "
              "(JAX / PyTorch) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        rows = suite_models(args)
        print(f"{load_average()} after")
    elif args.suite == "methods":
        unknown = sorted(set(filter(None, args.methods.split(","))) - set(METHODS))
        if unknown:
            parser.error(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
        if args.repeats < 1:
            parser.error(f"--repeats must be >= 1, got {args.repeats}")
        default_shape = (512, 16) if args.method_model == "toy" else MODEL_SPECS[args.method_model]["train_shape"]
        args.batch, args.seq = args.batch or default_shape[0], args.seq or default_shape[1]
        print(f"{args.method_model} model, batch {args.batch} x seq {args.seq}; lora rank 2, the others at rank 2 per "
              f"module (r_max 4, from rank 1; studies/benchmarking.METHODS_SUITE_ADAPTER), at the start of a run; "
              f"{args.repeats} rounds, one step of each method per round, the order rotated every round, after two "
              f"warm-up steps; {load_average()} before")
        print("| method | rows in the forward | step min / median / mean | median / lora | min / lora | "
              "compiled temporaries | / lora | peak memory | / lora |")
        print("|---|---|---|---|---|---|---|---|---|")
        rows = suite_methods(args)
        print(f"{load_average()} after")
    elif args.suite == "step_memory":
        print("compiled train-step temporaries (activations kept for backward + scratch); ratio to lora")
        print("| model | batch x seq | method | slot chunk | remat | temporaries | ratio to lora |")
        print("|---|---|---|---|---|---|---|")
        rows = suite_step_memory(args)
        if rows and rows[0].get("device") == "cpu":
            print("(CPU compiler: remat rows show no saving here; measure them on a GPU)")
    else:
        print(f"train-step time, median of {args.repeats} after compile; train.log_every_steps={args.log_every}; "
              f"train.grad_accum_steps={args.grad_accum_steps}")
        chunks = _slot_chunks(args.slot_chunks)
        print("step (ratio to lora) per adapter.slot_chunk_size")
        print("| method | live slots L | " + " | ".join(f"chunk {c or 'all'}" for c in chunks) + " |")
        print("|---|---|" + "---|" * len(chunks))
        rows = suite_slots(args, chunks)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
