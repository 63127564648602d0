"""Train-step time (toy model) and compiled train-step memory (any model), for launch/benchmark.py; not tests."""

from __future__ import annotations

import statistics
import tempfile
import time

import jax
import numpy as np

from adapad_jax.models.base import LoadedModel
from adapad_jax.training.sharding import make_mesh
from adapad_jax.testing.toy import make_toy_model, planted_teacher, toy_batch, toy_config
from adapad_jax.training.trainer import Trainer

# The timed steps are ones the trainer does not log (nine in ten at the default train.log_every_steps), where
# adapad skips the committed forward that only yields the logged loss.
UNLOGGED_STEPS = {"train.log_every_steps": 10}


def time_train_step(
    method: str = "adapad", live_slots: int = 1, repeats: int = 5, hidden: int = 256, num_layers: int = 2,
    batch_size: int = 512, seq_len: int = 16, data: int = 1, components: int = 1, slot_chunk_size: int = 0,
    log_every: int = UNLOGGED_STEPS["train.log_every_steps"], grad_accum_steps: int = 1,
) -> dict:
    """Median wall time of the compiled train step with ``live_slots`` live slots (adapad) or rank 1 (lora).

    ``slot_chunk_size`` is ``adapter.slot_chunk_size``: 0 runs every live slot in one vmapped pass, c > 0 runs
    c slots at a time under ``lax.scan``. ``log_every`` is ``train.log_every_steps``: with 1 every timed step
    is a logged one (adapad then also runs the committed forward). ``grad_accum_steps``: micro-batches per step.
    """
    model = make_toy_model(hidden=hidden, num_layers=num_layers, vocab_size=512)
    teacher = planted_teacher(model, [1] * len(model.targets))
    overrides = {"adapter.method": method, "adapter.r_max": 8, "adapter.grow": False, "adapter.lora_rank": 1,
                 "adapter.initial_rank": live_slots, "adapter.rank_budget": 8 * len(model.targets),
                 "checkpoint.every_steps": 0, "mesh.data": data, "mesh.components": components,
                 "adapter.slot_chunk_size": slot_chunk_size, "train.log_every_steps": log_every,
                 "train.grad_accum_steps": grad_accum_steps}
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
            "batch_size": batch_size, "slot_chunk_size": slot_chunk_size, "log_every": log_every,
            "grad_accum_steps": grad_accum_steps}


def step_memory(
    model: LoadedModel, method: str = "adapad", live_slots: int = 8, batch_size: int = 16, seq_len: int = 384,
    slot_chunk_size: int = 0, remat: bool = False, grad_accum_steps: int = 1,
) -> dict:
    """XLA's buffer assignment for the compiled train step (compile only, nothing runs): bytes of temporaries
    (activations kept for the backward pass and scratch), arguments and outputs, for ``live_slots`` live slots
    (adapad/joint) or rank ``live_slots`` (lora), with ``train.grad_accum_steps`` micro-batches."""
    overrides = {"adapter.method": method, "adapter.r_max": 8, "adapter.grow": False,
                 "adapter.lora_rank": live_slots, "adapter.initial_rank": live_slots,
                 "adapter.rank_budget": 8 * len(model.targets), "adapter.slot_chunk_size": slot_chunk_size,
                 "adapter.remat": remat, "checkpoint.every_steps": 0, "train.grad_accum_steps": grad_accum_steps}
    if model.task not in ("qa", "classification"):
        raise ValueError(f"step_memory supports qa and classification models, got task {model.task!r}")
    batch = random_batch(model, batch_size, seq_len)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model, toy_config(**overrides), make_mesh(1, 1), out)
        trainer.restore_or_init({})
        start = time.perf_counter()
        compiled = trainer.compiled_step().lower(trainer.state, trainer.frozen, trainer.put_batch(batch)).compile()
        compile_s = time.perf_counter() - start
        live = trainer.live_slots
        trainer.close()
    analysis = compiled.memory_analysis()
    return {"temp_bytes": int(analysis.temp_size_in_bytes), "argument_bytes": int(analysis.argument_size_in_bytes),
            "output_bytes": int(analysis.output_size_in_bytes), "compile_s": compile_s, "live_slots": live,
            "slot_chunk_size": slot_chunk_size, "remat": remat, "grad_accum_steps": grad_accum_steps,
            "device": jax.devices()[0].device_kind}


def random_batch(model: LoadedModel, batch_size: int, seq_len: int, seed: int = 0) -> dict:
    """A random batch of the model's task (token ids, full mask, labels or answer spans)."""
    rng = np.random.default_rng(seed)
    batch = {
        "input_ids": rng.integers(5, 1000, size=(batch_size, seq_len)).astype(np.int32),
        "attention_mask": np.ones((batch_size, seq_len), np.int32),
        "example_weight": np.ones((batch_size,), np.float32),
    }
    if model.task == "qa":
        batch["start_positions"] = rng.integers(0, seq_len, size=(batch_size,)).astype(np.int32)
        batch["end_positions"] = batch["start_positions"]
    elif model.task == "classification":
        batch["labels"] = rng.integers(0, 2, size=(batch_size,)).astype(np.int32)
    else:
        raise ValueError(f"random_batch supports qa and classification models, got task {model.task!r}")
    if model.uses_token_type_ids:
        batch["token_type_ids"] = np.zeros((batch_size, seq_len), np.int32)
    return batch


def time_real_step(
    model: LoadedModel, method: str, live_slots: int, batch_size: int, seq_len: int, *, slot_chunk_size: int = 1,
    remat: bool = False, components: int = 1, repeats: int = 5,
) -> dict:
    """The real train step of ``model`` (``lora`` rank ``live_slots`` or ``adapad`` with L = ``live_slots``):
    median/min wall time after a warm-up call, XLA's FLOP count and temporaries for the compiled step."""
    overrides = {"adapter.method": method, "adapter.r_max": 8, "adapter.grow": False,
                 "adapter.lora_rank": live_slots, "adapter.initial_rank": live_slots,
                 "adapter.rank_budget": 8 * len(model.targets), "adapter.slot_chunk_size": slot_chunk_size,
                 "adapter.remat": remat, "checkpoint.every_steps": 0, "mesh.components": components,
                 **UNLOGGED_STEPS}
    batches = [random_batch(model, batch_size, seq_len, seed) for seed in range(repeats + 1)]
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model, toy_config(**overrides), make_mesh(1, components), out)
        trainer.restore_or_init({})
        start = time.perf_counter()
        compiled = trainer.compiled_step().lower(trainer.state, trainer.frozen,
                                                 trainer.put_batch(batches[0])).compile()
        compile_s = time.perf_counter() - start
        jax.block_until_ready(trainer.train_step(batches[0]))
        times = []
        for batch in batches[1:]:
            start = time.perf_counter()
            jax.block_until_ready(trainer.train_step(batch))
            times.append(time.perf_counter() - start)
        live = trainer.live_slots
        trainer.close()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    memory = compiled.memory_analysis()
    return {"median_s": statistics.median(times), "min_s": min(times), "compile_s": compile_s, "live_slots": live,
            "flops": float((cost or {}).get("flops", 0.0)), "temp_bytes": int(memory.temp_size_in_bytes),
            "slot_chunk_size": slot_chunk_size, "remat": remat, "components": components,
            "device": jax.devices()[0].device_kind}


# ------------------------------------------------------------------------------- every method against lora

# The methods suite's like-for-like settings: the GLUE presets' shape (lora rank 2; the adaptive methods at the same
# total rank 2 per module, r_max 4 rows, growth from rank 1), at the start of a run. Growth, re-masks and the
# other rank rules run on their own schedules; the timed steps are the method's steady step between those (the
# median), and a rule that fires in the timed window shows in the mean. AdaLoRA re-masks every deltaT = 10 steps
# (its GLUE scripts' value; PEFT's default is every step).
METHODS_SUITE_ADAPTER = {"adapter.r_max": 4, "adapter.lora_rank": 2, "adapter.initial_rank": 1, "adapter.top_k": 1,
                         "adapter.growth_interval": 100, "adapter.slot_chunk_size": 1, "adapter.adalora.deltaT": 10}
METHODS_SUITE_STEPS = 100_000  # the run's length the schedules see (no schedule ends inside the timed window)


class MethodStep:
    """One method's trainer on ``model`` with fixed batches: ``run()`` times one train step (plus the method's
    host-side rule when due, as ``Trainer.train`` runs it), ``temp_bytes`` is XLA's temporaries of the compiled
    step. Raises the trainer's ConfigError when the method cannot start (e.g. not wired yet)."""

    def __init__(self, model: LoadedModel, method: str, batches: list[dict], output_dir: str):
        from adapad_jax.studies.planted import train_step_with_rules

        self._step_with_rules = train_step_with_rules
        overrides = {**METHODS_SUITE_ADAPTER, "adapter.method": method, "checkpoint.every_steps": 0,
                     "adapter.rank_budget": 2 * len(model.targets), "train.num_steps": METHODS_SUITE_STEPS,
                     "train.log_every_steps": METHODS_SUITE_STEPS, "train.batch_size": len(batches[0]["input_ids"])}
        self.trainer = Trainer(model, toy_config(**overrides), make_mesh(1, 1), output_dir)
        self.trainer.restore_or_init({})
        self.batches, self.index = batches, 0
        compiled = self.trainer.compiled_step().lower(self.trainer.state, self.trainer.frozen,
                                                      self.trainer.put_batch(batches[0])).compile()
        self.temp_bytes = int(compiled.memory_analysis().temp_size_in_bytes)

    def run(self) -> float:
        """Seconds of one train step on the next batch."""
        batch = self.batches[self.index % len(self.batches)]
        self.index += 1
        start = time.perf_counter()
        self._step_with_rules(self.trainer, batch)
        return time.perf_counter() - start

    @property
    def live_rows(self) -> int:
        return self.trainer.live_slots

    def close(self) -> None:
        self.trainer.close()


def toy_methods_model(batch_size: int, seq_len: int) -> tuple[LoadedModel, list[dict]]:
    """The methods suite's default model (the slots suite's toy: hidden 256, 2 blocks, regression on a planted
    teacher) and 4 batches of it."""
    model = make_toy_model(hidden=256, num_layers=2, vocab_size=512)
    teacher = planted_teacher(model, [1] * len(model.targets))
    return model, [toy_batch(model, teacher, i, batch_size, seq_len) for i in range(4)]
