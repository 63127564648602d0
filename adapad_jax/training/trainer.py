"""The training loop: state init/restore, compiled steps cached by L, and a plain step loop calling hooks.

One class because it owns one object's lifecycle (state, compiled steps, checkpointer, sinks); the rules it
applies live elsewhere: the config fields it reads (``settings.py``), the step (``step.py``), sharding
(``sharding.py``), growth (``allocator.py``), what happens after a step: logging, evaluation, checkpoints, the
guard, preemption (``hooks.py``), failure handling (``guard.py``, ``preemption.py``, ``recovery.py``), output
files (``run.core.export_trainer``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from adapad_jax.runtime import progress as progress_lib
from adapad_jax.models.base import LoadedModel
from adapad_jax.methods import allocator as alloc_lib
from adapad_jax.config.validation import batch_splits, budget_field, budget_from_params, check_method
from adapad_jax.methods.registry import build_method
from adapad_jax.training.checkpointing import Checkpointer
from adapad_jax.training import recovery
from adapad_jax.training.hooks import (
    Cadence, CheckpointHook, EvalHook, GuardHook, LogHook, PreemptionHook, ProfileHook, StepInfo, TrainerHooks,
)
from adapad_jax.training.preemption import stop_requests
from adapad_jax.training.optim import make_optimizer
from adapad_jax.training.precision import frozen_storage, module_dtype
from adapad_jax.training.profiling import step_profiler
from adapad_jax.training.settings import TrainerSettings
from adapad_jax.training.sharding import (
    COMPONENTS_AXIS,
    DATA_AXIS,
    batch_sharding,
    process_batch_slice,
    replicated,
    train_state_shardings,
)
from adapad_jax.training.step import (
    StepSpec, build_eval_forward, build_train_step, head_key, merge_head,
)
from adapad_jax.training.tracking import open_run_log
from adapad_jax.outputs.layout import CHECKPOINTS_DIR


def _subtree(tree: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        tree = tree[name]
    return tree


def best_checkpoint_metric(config: Any) -> tuple[str, str]:
    """(key in the evaluation results, 'max' or 'min') that ranks checkpoints for ``train.select_best``."""
    from adapad_jax.config.validation import task_spec_for
    from adapad_jax.metrics import main_metric

    return main_metric(task_spec_for(config))


def to_host(tree: Any) -> Any:
    """Numpy copy of a tree of global arrays; with several processes every process joins the gather."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


class Trainer:
    """Trains the adapters and head of ``model`` with ``config.adapter.method`` on ``mesh``.

    Use: ``Trainer(model, config, mesh, output_dir)``; ``data_state = trainer.restore_or_init(data_state)``;
    ``trainer.train(batches, num_steps, data_state_fn)``; then ``predict`` / ``ranks`` / ``committed_peft_factors``;
    ``run.core.export_trainer(trainer)`` writes the output files. ``num_steps`` is the run's total (the schedule ends there); checkpoints go to
    ``output_dir/checkpoints`` and metrics to ``output_dir/metrics.jsonl``.

    Several processes (``jax.distributed``): every process runs the same calls; each feeds its block of the
    global batch (``batch_slice`` = (index, count) for the data pipeline), outputs are gathered to every
    process, and only process 0 writes files (checkpoints are written by orbax across processes).
    """

    def __init__(
        self, model: LoadedModel, config: Any, mesh: Mesh, output_dir: str | Path,
        *, checkpoint_dir: str | Path | None = None,
    ):
        """``config``: the run's ConfigDict, read once into ``self.settings`` (``TrainerSettings``); the run log
        (W&B/TensorBoard) and the best-checkpoint metric take it whole at construction.

        ``checkpoint_dir``: another run's checkpoints, opened read-only (default: ``output_dir/checkpoints``).
        """
        check_method(config.adapter.method)
        if not model.targets:
            raise ValueError("the model has no adapter targets; check adapter.target_modules")
        settings = TrainerSettings.from_config(config)
        # adapter.param_budget -> the rank budget (lora: lora_rank) the method is built with, and what it came from.
        self.budget_conversion: dict[str, Any] | None = None
        if settings.param_budget > 0:
            field = budget_field(settings.method)
            widths = [t.in_features + t.out_features for t in model.targets]
            value = budget_from_params(settings.param_budget, widths, settings.method, settings.initial_rank)
            settings = dataclasses.replace(settings, **{field: value})
            self.budget_conversion = {"param_budget": settings.param_budget, "field": f"adapter.{field}",
                                      "value": value, "modules": len(widths), "mean_width": sum(widths) / len(widths)}
        self.settings = settings
        self.model, self.mesh = model, mesh
        self.output_dir = Path(output_dir)
        self.method = settings.method
        self.data_size = mesh.shape[DATA_AXIS]
        self.components = mesh.shape[COMPONENTS_AXIS]
        self.batch_slice = process_batch_slice(mesh)
        self.writes_files = jax.process_index() == 0
        # The method's rules: rows per module, scale, budget, forward, loss terms, rank update, export.
        self.method_impl = build_method(settings, model.targets, self.components)
        setup = self.method_impl.setup
        self.num_slots, self.scaling = setup.num_slots, setup.scaling
        self._initial_rank, self._budget = setup.initial_rank, setup.rank_budget
        self.alloc_config = getattr(self.method_impl, "alloc_config", alloc_lib.AllocatorConfig(
            r_max=self.num_slots, top_k=settings.top_k, growth_interval=settings.growth_interval, grow=False))
        self.advance_learning = setup.advance_learning
        self.sync_every = settings.sync_every or settings.growth_interval
        # Steps whose metrics the trainer writes; AdaPaD computes the committed loss only on those (`StepSpec`).
        self.log_every = settings.log_every
        self.input_keys = ("input_ids", "attention_mask") + (("token_type_ids",) if model.uses_token_type_ids else ())
        self.use_dropout = settings.dropout > 0 or settings.classifier_dropout > 0
        # bf16 models keep their frozen kernels and embeddings in bf16 on the devices (same numbers, half the memory)
        self.frozen = jax.device_put(frozen_storage(model.params, module_dtype(model.module)), replicated(mesh))
        self.select_best = settings.select_best
        best = best_checkpoint_metric(config) if self.select_best else None
        if checkpoint_dir is None:
            self.checkpointer = Checkpointer(self.output_dir / CHECKPOINTS_DIR, settings.checkpoint_keep, best=best)
        else:
            self.checkpointer = Checkpointer(checkpoint_dir, 0, read_only=True, best=best)
        self.metrics = open_run_log(self.output_dir, config, enabled=self.writes_files)
        self.state: dict[str, Any] | None = None
        self._steps: dict[tuple[int, int], Callable] = {}
        self._total_steps = settings.num_steps
        self.tx, self.schedule = make_optimizer(settings.optim, self._total_steps)
        self.method_impl.set_total_steps(self._total_steps)
        self._eval = jax.jit(build_eval_forward(model.module, model.targets, self.method_impl, self.input_keys))

    # ----------------------------------------------------------------- state
    def init_state(self) -> dict[str, Any]:
        """A fresh train state (slots from ``config.seed``), placed on the mesh by ``state_shardings``."""
        root = jax.random.PRNGKey(self.settings.seed)
        method = self.method_impl
        slots = method.init_slots(jax.random.fold_in(root, 1))
        # Copies (jnp.array): the train step donates the state, which must not take the model's own head arrays.
        head = {head_key(p): jax.tree.map(jnp.array, _subtree(self.model.params, tuple(p)))
                for p in self.model.head_prefixes}
        trainable = {"slots": slots, "head": head, **method.init_extra(jax.random.fold_in(root, 3))}
        state = {
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.fold_in(root, 2),
            "trainable": trainable,
            "opt_state": self.tx.init(method.optimizer_params(trainable)),
            "snapshot": jax.tree.map(jnp.copy, slots),
            "alloc": method.init_alloc(),
        }
        method_state = method.init_method_state(trainable)
        if method_state:
            state["method"] = method_state
        return jax.device_put(state, self.state_shardings(state))

    def state_shardings(self, state: dict[str, Any]) -> Any:
        """Where each leaf of the train state lives on the mesh (``sharding.train_state_shardings``)."""
        return train_state_shardings(self.mesh, state)

    def restore_or_init(self, data_state: dict, step: int | None = None) -> dict:
        """Restore the newest checkpoint in ``output_dir`` (or ``step``), returning its data state; else init.

        Returns ``data_state`` unchanged when there is no checkpoint to restore.
        """
        if step is None and self.checkpointer.latest_step() is None:
            self.state = self.init_state()
            return data_state
        saved_data_state = self.restore(step) if step is not None else recovery.restore_newest_intact(self)
        self.metrics.truncate_after(self.step)
        return saved_data_state

    def restore(self, step: int | None = None) -> dict:
        """Load checkpoint ``step`` (default: the newest) into ``self.state``; returns its saved data state.

        Raises ValueError when there is no such checkpoint or it was written by a different kind of run.
        """
        available = self.checkpointer.all_steps()
        if step is None and not available:
            raise ValueError(f"no checkpoint to restore in {self.checkpointer.directory}")
        if step is not None and step not in available:
            raise ValueError(
                f"no checkpoint for step {step} in {self.checkpointer.directory}; available: {available}"
            )
        step = available[-1] if step is None else step
        fresh = self.init_state()
        meta = recovery.read_or_damaged(step, lambda: self.checkpointer.restore_meta(step))
        saved = {"method": meta.get("method"), "modules": sorted(meta.get("ranks", {}))}
        current = {"method": self.method, "modules": sorted(self.ranks_of(fresh))}
        if saved != current:
            raise recovery.ResumeMismatch(
                f"the checkpoint at step {step} in {self.checkpointer.directory} was written by a different run "
                f"(method {saved['method']!r}, {len(saved['modules'])} adapted modules) than this one (method "
                f"{current['method']!r}, {len(current['modules'])} modules); use a new output_dir or the same config"
            )
        recovery.check_same_shapes(step, meta, fresh, self.checkpointer.directory)
        self.state, meta = recovery.read_or_damaged(step, lambda: self.checkpointer.restore(step, fresh))
        self.state = recovery.apply_budget_change(self, meta, step)
        return meta["data_state"]

    @property
    def step(self) -> int:
        """Number of completed train steps."""
        return int(self.state["step"])

    @property
    def rank_budget(self) -> int:
        """The total rank at which growth stops (lora, fixed rank: the modules' total)."""
        return int(self._budget)

    @property
    def live_slots(self) -> int:
        """L for the current allocator state (joint/lora: rows in the single forward)."""
        return self.method_impl.num_live_rows(self.state["alloc"], self.state.get("method", {}))

    def rank_schedule(self, num_steps: int | None = None) -> dict[str, Any]:
        """Budget, the total rank growth can reach in ``num_steps`` (default: the run's), and where it stands now."""
        steps = self._total_steps if num_steps is None else int(num_steps)
        modules = len(self.model.targets)
        own = getattr(self.method_impl, "reachable_total_rank", None)  # a method whose growth is not the allocator's
        reachable = own(steps) if own is not None else alloc_lib.reachable_total_rank(
            modules, self._initial_rank, self._budget, steps, self.alloc_config)
        spent = int(self.state["alloc"]["budget_spent_step"]) if self.state is not None else -1
        return {
            "rank_budget": alloc_lib.rank_capacity(self._budget, modules, self.num_slots),
            "reachable_total_rank": int(reachable),
            "total_rank": int(np.asarray(self.state["alloc"]["rank"]).sum()) if self.state is not None else None,
            "budget_spent_step": spent if spent >= 0 else None,
        }

    # ------------------------------------------------------------------ step
    def _spec(self, live: int) -> StepSpec:
        settings = self.settings
        padded = live if not self.method_impl.deflated else math.ceil(live / self.components) * self.components
        return StepSpec(
            method=self.method, task=self.model.task, scaling=self.scaling, live_slots=live, padded_slots=padded,
            advance_learning=self.advance_learning, orth_reg=settings.orth_reg, sync_every=self.sync_every,
            slot_chunk_size=settings.slot_chunk_size, remat=settings.remat, use_dropout=self.use_dropout,
            input_keys=self.input_keys, alloc=self.alloc_config,
            head_gradient=settings.head_gradient, log_every=self.log_every, num_steps=self._total_steps,
            grad_accum_steps=settings.grad_accum_steps, impl=self.method_impl,
        )

    def compiled_step(self, live: int | None = None) -> Callable:
        """The jitted train step for L = ``live`` (default: current), cached by (L, total steps)."""
        live = self.live_slots if live is None else live
        key = (live, self._total_steps)
        if key not in self._steps:
            step_fn = build_train_step(self.model.module, self.model.targets, self._spec(live), self.mesh, self.tx,
                                       self.schedule)
            rep, data = replicated(self.mesh), batch_sharding(self.mesh)
            state_sh = self.state_shardings(self.state)
            self._steps[key] = jax.jit(
                step_fn, in_shardings=(state_sh, rep, data), out_shardings=(state_sh, rep), donate_argnums=0
            )
        return self._steps[key]

    def _set_total_steps(self, total: int) -> None:
        total = max(int(total), 1)
        if total != self._total_steps:
            self._total_steps = total
            self.tx, self.schedule = make_optimizer(self.settings.optim, total)
            self.method_impl.set_total_steps(total)

    def put_batch(self, batch: dict) -> dict:
        size = len(next(iter(batch.values()))) * self.batch_slice[1]
        if not batch_splits(size, self.data_size):
            raise ValueError(f"batch size {size} is not divisible by mesh.data={self.data_size}")
        return self._place({k: np.asarray(v) for k, v in batch.items()})

    def _place(self, batch: dict) -> dict:
        """This process's block of a global batch -> global arrays split over ``data``."""
        sharding = batch_sharding(self.mesh)
        if jax.process_count() > 1:
            count = self.batch_slice[1]
            return {
                k: jax.make_array_from_process_local_data(sharding, v, (len(v) * count,) + v.shape[1:])
                for k, v in batch.items()
            }
        return jax.device_put(batch, sharding)

    def train_step(self, batch: dict) -> dict:
        """Run one step on ``batch`` and return its metrics (device arrays)."""
        self.state, metrics = self.compiled_step()(self.state, self.frozen, self.put_batch(batch))
        return metrics

    def train(
        self,
        batches: Iterator[dict],
        num_steps: int,
        data_state_fn: Callable[[], dict],
        eval_fn: Callable[["Trainer"], dict] | None = None,
        eval_every: int = 0,
        progress: bool = True,
    ) -> None:
        """Train until ``num_steps`` total steps (the schedule ends there); after each step ``default_hooks`` log,
        evaluate, checkpoint, guard and stop.

        ``eval_fn`` runs every ``eval_every`` steps (and at the last step with ``train.select_best``, whose
        checkpoints then carry the metrics); ``progress``: see ``adapad_jax.runtime.progress``.
        """
        if self.state is None:
            raise RuntimeError("call restore_or_init() before train()")
        self._set_total_steps(num_steps)
        profile = step_profiler(self.settings.profile_start_step, self.settings.profile_num_steps, self.output_dir,
                                num_steps, self.writes_files)
        bar = progress_lib.train_progress(progress, num_steps, self.step, self.method)
        live = self.live_slots
        step = self.step
        with stop_requests() as stop, profile as profiler:
            hooks = self.default_hooks(step, num_steps, data_state_fn, eval_fn, eval_every, bar, stop, profiler)
            # The step count is kept on the host: reading it from the state would wait for every step to finish
            # before the next is dispatched.
            while step < num_steps:
                batch = next(batches)
                hooks.before_step(step + 1)
                self.state, metrics = self.compiled_step(live)(self.state, self.frozen, self.put_batch(batch))
                step += 1
                info = StepInfo(step, num_steps, metrics, live)
                hooks.run(info)
                live = info.live_slots
            hooks.finish()
        bar.close()

    def default_hooks(
        self, start_step: int, num_steps: int, data_state_fn: Callable[[], dict],
        eval_fn: Callable[["Trainer"], dict] | None, eval_every: int, bar: Any, stop: Any, profiler: Any,
    ) -> TrainerHooks:
        """The run's hooks, in their order of effects: guard, profile, L, log, progress, eval, checkpoint, stop."""
        hooks = TrainerHooks()
        guard = GuardHook(start_step, self.checkpointer.latest_step)
        hooks.add_hook(guard.update, every=1)
        hooks.add_hook(ProfileHook(profiler), every=1)
        hooks.add_hook(self._host_update, when=lambda info: self.method_impl.host_update_due(info.step))
        hooks.add_hook(guard.check, every=self.log_every)  # where the loop syncs anyway
        log = LogHook(start_step, self.ranks, self.metrics, sinks=(bar.logged,), clock=time.perf_counter)
        hooks.add_hook(log, every=self.log_every)
        hooks.add_hook(lambda info: bar.advance(1), every=1)
        if eval_fn is not None:  # at the end only with select_best (run.py evaluates the final state otherwise)
            evaluate = EvalHook(lambda: eval_fn(self), self.metrics, sinks=(bar.evaluated,))
            hooks.add_hook(evaluate, every=eval_every, at_end=self.select_best)
        checkpoint = CheckpointHook(self.settings.checkpoint_every, lambda best: self.save(data_state_fn(), best),
                                    guard.check, self.select_best)
        hooks.add_hook(checkpoint, when=checkpoint.due)
        log_step = Cadence(self.log_every, at_end=True)
        stop_hook = PreemptionHook(stop, lambda info: log_step.due(info.step, info.num_steps),
                                   lambda: self.save(data_state_fn()), guard.check, self.checkpointer)
        hooks.add_hook(stop_hook, every=1)
        hooks.add_finish(guard.check)
        return hooks

    def _host_update(self, info: StepInfo) -> None:
        """After a step where the method's rank rule may run on the host (a growth step): apply it, then L for
        the next steps' compiled step."""
        new_state = self.method_impl.host_update(self.state, info.step)
        if new_state is not None:
            self.state = jax.device_put(new_state, self.state_shardings(new_state))
        info.live_slots = self.live_slots

    def eval_due(self, step: int, num_steps: int, eval_every: int) -> bool:
        """Evaluate after ``step``? Every ``eval_every`` steps before the end; at the end when selecting the best."""
        if step == num_steps:
            return self.select_best
        return eval_every > 0 and step % eval_every == 0

    def save(self, data_state: dict, eval_metrics: dict | None = None) -> None:
        """Checkpoint the current state with the data position and L (and its evaluation, to rank checkpoints)."""
        meta = {"data_state": data_state, "live_slots": self.live_slots, "step": self.step, "method": self.method,
                "ranks": self.ranks()}
        if eval_metrics is not None:  # JSON numbers only
            eval_metrics = {k: float(v) for k, v in eval_metrics.items() if isinstance(v, (int, float, np.number))}
        meta.update(recovery.identity_meta(self))
        recovery.require_finite(self.state, self.step, "checkpoint")
        recovery.save_or_fail(self.checkpointer, self.step, self.state, meta, metrics=eval_metrics)

    def best_step(self) -> int | None:
        """The evaluated checkpoint with the best main metric (``train.select_best``), or None."""
        return self.checkpointer.best_step() if self.select_best else None

    # ------------------------------------------------------------ evaluation
    def predict(self, batch: dict) -> dict[str, np.ndarray]:
        """Eval forward (current committed slots only) on this process's block of a global batch.

        Returns numpy outputs for the whole global batch (gathered from every process).
        """
        count = self.batch_slice[1]
        size = len(next(iter(batch.values()))) * count
        pad = (-size) % self.data_size
        if count > 1 and not batch_splits(size, self.data_size):
            raise ValueError(f"global eval batch of {size} rows is not divisible by mesh.data={self.data_size}")
        inputs = {k: np.asarray(batch[k]) for k in self.input_keys}
        if pad:
            inputs = {k: np.concatenate([v, np.repeat(v[-1:], pad, axis=0)]) for k, v in inputs.items()}
        inputs = self._place(inputs)
        outputs = self._eval(self.state["trainable"], self.state["alloc"], self.state.get("method", {}), self.frozen,
                             inputs)
        return {k: v[:size] for k, v in to_host(outputs).items()}

    # --------------------------------------------------------------- outputs
    def ranks(self) -> dict[str, int]:
        """``{hf_path: committed rank}``."""
        return self.ranks_of(self.state)

    def ranks_of(self, state: dict[str, Any]) -> dict[str, int]:
        """``{hf_path: committed rank}`` of a train state."""
        rank = np.asarray(state["alloc"]["rank"])
        return {t.hf_path: int(r) for t, r in zip(self.model.targets, rank)}

    def committed_peft_factors(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{hf_path: (A [r, in], B [out, r])}`` of the committed slots; delta W^T = scaling * B @ A."""
        host = to_host({"trainable": self.state["trainable"], "alloc": self.state["alloc"],
                        "method": self.state.get("method", {})})
        return self.method_impl.export_factors(host["trainable"], host["alloc"], host["method"])

    def accounting(self) -> dict[str, Any]:
        """The adapter parameters of the current state (``Method.accounting``: factors, with_extras,
        with_reserves, head, paper, paper_count) and the budget they answer to (``param_budget``, 0 = off, and
        ``converted_to``: the rank field it set)."""
        host = to_host({"trainable": self.state["trainable"], "alloc": self.state["alloc"],
                        "method": self.state.get("method", {})})
        counts = self.method_impl.accounting(host["trainable"], host["alloc"], host["method"])
        counts["param_budget"] = int(self.settings.param_budget)
        if self.budget_conversion is not None:
            counts["converted_to"] = {self.budget_conversion["field"]: int(self.budget_conversion["value"])}
        return counts

    def trained_params(self) -> dict[str, Any]:
        """The model params (numpy) with the trained head in place."""
        return merge_head(self.model.params, to_host(self.state["trainable"]["head"]))  # full-precision backbone

    def close(self) -> None:
        """Release the checkpoint manager and the metric sinks (the sinks also when the manager fails)."""
        try:
            self.checkpointer.close()
        finally:
            self.metrics.close()
