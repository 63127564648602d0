"""Step-time measurement of the train step on the toy model (used by launch/benchmark.py; not a test)."""

from __future__ import annotations

import statistics
import tempfile
import time

import jax

from adapad_jax.training.sharding import make_mesh
from adapad_jax.training.toy import make_toy_model, planted_teacher, toy_batch, toy_config
from adapad_jax.training.trainer import Trainer


def time_train_step(
    method: str = "adapad", live_slots: int = 1, repeats: int = 5, hidden: int = 256, num_layers: int = 2,
    batch_size: int = 512, seq_len: int = 16, data: int = 1, components: int = 1,
) -> dict:
    """Median wall time of the compiled train step with ``live_slots`` live slots (adapad) or rank 1 (lora)."""
    model = make_toy_model(hidden=hidden, num_layers=num_layers, vocab_size=512)
    teacher = planted_teacher(model, [1] * len(model.targets))
    overrides = {"adapter.method": method, "adapter.r_max": 8, "adapter.grow": False, "adapter.lora_rank": 1,
                 "adapter.initial_rank": live_slots, "adapter.rank_budget": 8 * len(model.targets),
                 "checkpoint.every_steps": 0, "mesh.data": data, "mesh.components": components}
    batches = [toy_batch(model, teacher, i, batch_size, seq_len) for i in range(repeats + 1)]
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model, toy_config(**overrides), make_mesh(data, components), out)
        trainer.restore_or_init({})
        assert trainer.live_slots == (1 if method == "lora" else live_slots)
        start = time.perf_counter()
        jax.block_until_ready(trainer.train_step(batches[0]))
        compile_s = time.perf_counter() - start
        times = []
        for batch in batches[1:]:
            start = time.perf_counter()
            jax.block_until_ready(trainer.train_step(batch))
            times.append(time.perf_counter() - start)
        trainer.close()
    return {"median_s": statistics.median(times), "min_s": min(times), "compile_s": compile_s,
            "live_slots": trainer.live_slots, "device": jax.devices()[0].device_kind, "hidden": hidden,
            "batch_size": batch_size}
