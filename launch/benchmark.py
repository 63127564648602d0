"""Side-by-side speed and memory benchmarks (not tests).

Suites:
  models  forward, and forward+backward with rank-8 adapters on every target, of
          DeBERTaV3-base-size and Qwen3-0.6B-size models (random weights, built
          from configs) in JAX and in transformers/PyTorch (+PEFT) on the same
          input; ratios JAX / PyTorch.
  slots   AdaPaD train-step time with L = 1, 2, 4, 8 live slots against the
          fixed-rank `lora` step on the same small model; ratios to `lora`.

Every measurement runs in its own subprocess, so peak memory (GPU allocator peak
when a GPU is present, else peak process RSS) belongs to that measurement alone.

  python launch/benchmark.py --suite models --batch 4 --seq 128
  python launch/benchmark.py --suite slots
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
sys.path.insert(0, str(ROOT))

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
    ),
}
ADAPTER_RANK = 8


def _hf_config(name: str):
    from transformers import AutoConfig

    spec = MODEL_SPECS[name]
    return AutoConfig.for_model(spec["model_type"], **spec["config"])


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


def _jax_model_worker(name: str, mode: str, batch: int, seq: int, repeats: int) -> dict:
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

    def forward(params, lora):
        out = model.module.apply({"params": params, "lora": lora}, **inputs, deterministic=True)
        return sum(jnp.sum(jnp.square(v.astype(jnp.float32))) for v in out.values())

    if mode == "fwd":
        fn = jax.jit(lambda p: model.module.apply({"params": p}, **inputs, deterministic=True))
        run = lambda: jax.block_until_ready(fn(model.params))  # noqa: E731
    else:
        grad_fn = jax.jit(jax.grad(forward, argnums=1))
        run = lambda: jax.block_until_ready(grad_fn(model.params, lora))  # noqa: E731
    compile_start = time.perf_counter()
    run()
    compile_s = time.perf_counter() - compile_start
    times = _time(run, repeats)
    return {"median_s": statistics.median(times), "first_call_s": compile_s, "peak_mib": _peak_memory_mib("jax")}


def _torch_model_worker(name: str, mode: str, batch: int, seq: int, repeats: int) -> dict:
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

    compile_start = time.perf_counter()
    run()
    first = time.perf_counter() - compile_start
    times = _time(run, repeats)
    return {"median_s": statistics.median(times), "first_call_s": first, "peak_mib": _peak_memory_mib("torch")}


def _slots_worker(method: str, live_slots: int, repeats: int) -> dict:
    from adapad_jax.training.benchmarking import time_train_step

    return time_train_step(method=method, live_slots=live_slots, repeats=repeats)


def _run_worker(args: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--_worker", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt(x: float | None, unit: str = "") -> str:
    return "n/a" if x is None else f"{x:.3f}{unit}" if unit == "s" else f"{x:.0f}{unit}"


def suite_models(args) -> list[dict]:
    rows = []
    for name in args.models.split(","):
        for mode in ("fwd", "fwd_bwd"):
            res = {fw: _run_worker(["models", fw, name, mode, str(args.batch), str(args.seq), str(args.repeats)])
                   for fw in ("jax", "torch")}
            rows.append({"model": name, "mode": mode, **{f"{fw}": r for fw, r in res.items()}})
            j, t = res["jax"], res["torch"]
            ratio = j["median_s"] / t["median_s"] if "median_s" in j and "median_s" in t else None
            mem_ratio = j["peak_mib"] / t["peak_mib"] if "peak_mib" in j and "peak_mib" in t else None
            print(
                f"| {name} | {mode} | {_fmt(j.get('median_s'), 's')} | {_fmt(t.get('median_s'), 's')} | "
                f"{'n/a' if ratio is None else f'{ratio:.2f}'} | {_fmt(j.get('peak_mib'), ' MiB')} | "
                f"{_fmt(t.get('peak_mib'), ' MiB')} | {'n/a' if mem_ratio is None else f'{mem_ratio:.2f}'} |"
                + (f" jax error: {j['error']}" if "error" in j else "")
                + (f" torch error: {t['error']}" if "error" in t else ""),
                flush=True,
            )
    return rows


def suite_slots(args) -> list[dict]:
    rows = []
    base = _run_worker(["slots", "lora", "1", str(args.repeats)])
    print(f"| lora (rank 1) | 1 | {_fmt(base.get('median_s'), 's')} | 1.00 |", flush=True)
    rows.append({"method": "lora", "live_slots": 1, **base})
    for live in (1, 2, 4, 8):
        res = _run_worker(["slots", "adapad", str(live), str(args.repeats)])
        ratio = res["median_s"] / base["median_s"] if "median_s" in res and "median_s" in base else None
        print(f"| adapad | {live} | {_fmt(res.get('median_s'), 's')} | "
              f"{'n/a' if ratio is None else f'{ratio:.2f}'} |" + (f" error: {res['error']}" if "error" in res else ""),
              flush=True)
        rows.append({"method": "adapad", "live_slots": live, **res})
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_worker":
        kind, *rest = sys.argv[2:]
        if kind == "models":
            fw, name, mode, batch, seq, repeats = rest
            worker = _jax_model_worker if fw == "jax" else _torch_model_worker
            result = worker(name, mode, int(batch), int(seq), int(repeats))
        else:
            method, live, repeats = rest
            result = _slots_worker(method, int(live), int(repeats))
        print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["models", "slots"], default="models")
    parser.add_argument("--models", default=",".join(MODEL_SPECS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="", help="also write the rows as JSON here")
    args = parser.parse_args()
    unknown = set(args.models.split(",")) - set(MODEL_SPECS)
    if unknown:
        parser.error(f"unknown model(s) {sorted(unknown)}; choose from {sorted(MODEL_SPECS)}")
    if args.suite == "models":
        print(f"batch {args.batch} x seq {args.seq}, median of {args.repeats} after a warm-up call")
        print("| model | mode | JAX | PyTorch | JAX/PyTorch time | JAX peak | PyTorch peak | JAX/PyTorch mem |")
        print("|---|---|---|---|---|---|---|---|")
        rows = suite_models(args)
    else:
        print(f"train-step time, median of {args.repeats} after compile")
        print("| method | live slots L | step | ratio to lora |")
        print("|---|---|---|---|")
        rows = suite_slots(args)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
