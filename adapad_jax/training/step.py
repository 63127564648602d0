"""The train step (deflated slots for ``adapad``, one forward for ``joint``/``lora``) and the eval forward.

Train state (a dict pytree, replicated on every device: ``Trainer.state_shardings``):
``step`` int32, ``rng`` uint32[2], ``trainable`` = ``{"slots": {"a": [...], "b": [...]}, "head": {name: subtree}}``,
``opt_state``, ``snapshot`` (stop-gradient copy of the slots), ``alloc`` (see ``allocator.py``).

For ``adapad`` the per-slot losses run inside ``jax.shard_map``: the slots' forward/backward passes split over
the mesh axis ``components``, the batch over ``data``. Each device reads the slots it trains (and the snapshot
below them) from its own copy, so a step crosses devices once: one ``psum`` of the gradients, slot losses and
committed loss over both axes (one all-reduce per dtype, see ``collectives.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec as P

from adapad_jax.adapters.slots import deflated_lora, masked_lora, to_lora_collection
from adapad_jax.adapters.target import AdapterTarget
from adapad_jax.methods import allocator as alloc_lib
from adapad_jax.training.collectives import psum_packed
from adapad_jax.training.losses import loss_terms
from adapad_jax.training.sharding import COMPONENTS_AXIS, DATA_AXIS
from adapad_jax.config.validation import batch_splits



@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything static about a compiled train step."""

    method: str
    task: str
    scaling: float
    live_slots: int  # L: 1 + highest live slot index (adapad) / number of rows in the forward (joint, lora)
    padded_slots: int  # L rounded up to a multiple of mesh.components (adapad)
    advance_learning: bool
    orth_reg: float
    sync_every: int
    slot_chunk_size: int
    remat: bool  # layer-wise rematerialisation (with_layer_remat)
    use_dropout: bool
    input_keys: tuple[str, ...]
    alloc: alloc_lib.AllocatorConfig
    head_gradient: str = "mean"  # adapad: "mean" over the L slot losses, or "committed" (committed_model_loss's)
    # adapad with head_gradient "mean": the committed forward only yields the logged loss, so it runs on the steps
    # the trainer logs (multiples of log_every, and step num_steps); the others report loss NaN.
    log_every: int = 1
    num_steps: int = 0
    # train.grad_accum_steps: each device's batch shard runs as this many micro-batches (lax.scan), gradients summed.
    grad_accum_steps: int = 1
    # The method's rules (``methods.base.Method``): forward coefficients, loss terms, rank update.
    impl: Any = None


def is_log_step(step: Any, log_every: int, num_steps: int) -> Any:
    """Whether the trainer logs after completed step ``step`` (1-based): every ``log_every`` steps and the last.
    Works on Python ints and traced arrays alike."""
    return (step % log_every == 0) | (step == num_steps)


def set_subtrees(params: Mapping[str, Any], subtrees: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    """A copy of nested dict ``params`` with the subtrees at the given paths replaced."""
    out = dict(params)
    for path, value in subtrees.items():
        node = out
        for name in path[:-1]:
            node[name] = dict(node[name])
            node = node[name]
        node[path[-1]] = value
    return out


def _subtree(tree: Mapping[str, Any], path: Sequence[str]) -> Any:
    for name in path:
        tree = tree[name]
    return tree


def head_key(path: Sequence[str]) -> str:
    """The name of a head subtree in the trainable tree."""
    return "/".join(path)


def merge_head(frozen: Mapping[str, Any], head: Mapping[str, Any]) -> dict[str, Any]:
    """Frozen params with the trainable head subtrees put back in place."""
    return set_subtrees(frozen, {tuple(name.split("/")): value for name, value in head.items()})


def _model_loss(module, spec: StepSpec, frozen, head, lora, batch, rng, denominator, first_row=None):
    """This data shard's share of the loss; ``rng`` is the step's (and slot's) dropout key.

    ``first_row``: the global batch row of ``batch``'s first example (default: this ``data`` shard's first row).
    """
    variables = {"params": merge_head(frozen, head), "lora": lora}
    inputs = {k: batch[k] for k in spec.input_keys}
    if not spec.use_dropout:
        outputs = module.apply(variables, **inputs, deterministic=True)
    else:
        # One dropout key per example from its row in the global batch, so the masks (and the run) do not depend
        # on how the batch is split over `data` devices or processes.
        rows = next(iter(inputs.values())).shape[0]
        first = jax.lax.axis_index(DATA_AXIS) * rows if first_row is None else first_row
        keys = jax.vmap(lambda row: jax.random.fold_in(rng, row))(first + jnp.arange(rows))

        def one_example(example, key):
            out = module.apply(variables, **{k: v[None] for k, v in example.items()}, deterministic=False,
                               rngs={"dropout": key})
            return jax.tree.map(lambda x: x[0], out)

        outputs = jax.vmap(one_example)(inputs, keys)
    numerator, _ = loss_terms(spec.task, outputs, batch)
    return numerator / denominator


def _weight_sum(batch) -> jax.Array:
    if "example_weight" in batch:
        return jnp.sum(batch["example_weight"].astype(jnp.float32))
    return jnp.asarray(next(iter(batch.values())).shape[0], jnp.float32)


def accumulate_micro_batches(terms: Callable[[Any, jax.Array], Any], batch: Mapping[str, Any], steps: int,
                             first_row: jax.Array) -> Any:
    """The sum over ``steps`` equal row slices of ``batch`` of ``terms(micro_batch, its first global row)``.

    ``terms`` returns additive quantities (gradients and losses already divided by the whole batch's weight sum),
    so the sum is the full batch's; the slices run one after another under ``lax.scan`` and only one slice's
    activations are live at a time. ``steps == 1`` is the plain call.
    """
    if steps == 1:
        return terms(batch, first_row)
    rows = next(iter(batch.values())).shape[0]
    if not batch_splits(rows, 1, steps):
        raise ValueError(f"train.grad_accum_steps={steps} does not divide the {rows} batch rows each data device "
                         "holds; train.batch_size must be divisible by train.grad_accum_steps x mesh.data")
    micro_rows = rows // steps
    micro = jax.tree.map(lambda x: x.reshape((steps, micro_rows) + x.shape[1:]), dict(batch))

    def body(total, xs):
        index, micro_batch = xs
        return jax.tree.map(jnp.add, total, terms(micro_batch, first_row + index * micro_rows)), None

    shapes = jax.eval_shape(terms, jax.tree.map(lambda x: x[0], micro), first_row)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    total, _ = jax.lax.scan(body, zeros, (jnp.arange(steps, dtype=jnp.int32), micro))
    return total


def _adapad_grads(module, targets, spec: StepSpec, mesh: Mesh, trainable, snapshot, alloc, frozen, batch, step_rng,
                  logged, method_state=None):
    """Per-slot deflated losses (sharded over ``components``) and the summed gradient.

    ``logged`` (a traced bool): whether the committed forward runs for the reported loss (``StepSpec.log_every``).
    """
    committed = alloc["committed"]
    method_state = {} if method_state is None else method_state
    live = spec.impl.live_mask(alloc, method_state)
    num_rows = spec.padded_slots

    components = mesh.shape[COMPONENTS_AXIS]
    num_slots = jax.tree.leaves(trainable["slots"])[0].shape[0]

    def body(trainable, snapshot, committed, live, frozen, batch, slot_ids, step_rng, logged):
        denominator = jnp.maximum(psum_packed(_weight_sum(batch), DATA_AXIS), 1e-12)

        def micro_terms(batch, first_row):
            """This device's share of the slot and head gradients, slot losses and committed loss on ``batch``."""

            def slot_loss(trainable, slot):
                lora = deflated_lora(targets, trainable["slots"], snapshot, committed, live, slot, spec.scaling,
                                     num_rows)
                head = trainable["head"] if spec.head_gradient == "mean" else jax.lax.stop_gradient(trainable["head"])
                loss = _model_loss(
                    module, spec, frozen, head, lora, batch, jax.random.fold_in(step_rng, slot), denominator, first_row
                )
                return jnp.where(slot < spec.live_slots, loss, 0.0)

            def chunk_objective(trainable, chunk_ids):
                losses = jax.vmap(slot_loss, in_axes=(None, 0))(trainable, chunk_ids)
                return losses.sum(), losses

            local = slot_ids.shape[0]
            chunk = spec.slot_chunk_size if 0 < spec.slot_chunk_size < local else local
            if local % chunk:
                chunk = next(c for c in range(chunk, 0, -1) if local % c == 0)
            grad_fn = jax.value_and_grad(chunk_objective, has_aux=True)
            if chunk == local:
                (_, losses), grads = grad_fn(trainable, slot_ids)
            else:
                def scan_body(acc, chunk_ids):
                    (_, losses), grads = grad_fn(trainable, chunk_ids)
                    return jax.tree.map(jnp.add, acc, grads), losses

                zeros = jax.tree.map(jnp.zeros_like, trainable)
                grads, losses = jax.lax.scan(scan_body, zeros, slot_ids.reshape(-1, chunk))
                losses = losses.reshape(-1)
            # Every slot's loss in its row of a full-length vector, so the one all-reduce below returns them all.
            all_losses = jnp.zeros((num_rows,), losses.dtype).at[jax.lax.axis_index(COMPONENTS_AXIS) * local
                                                                  + jnp.arange(local)].set(losses)
            # The committed forward is the same on every `components` device: each runs it on its share of the rows.
            batch_rows = next(iter(batch.values())).shape[0]
            if components > 1 and batch_rows % components == 0:
                piece = batch_rows // components
                start = jax.lax.axis_index(COMPONENTS_AXIS) * piece
                rows_part = jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, piece, axis=0), batch)
                part_first_row, share = first_row + start, 1.0
            else:  # every `components` device computes the whole micro-batch: count it once
                rows_part, part_first_row, share = batch, first_row, 1.0 / components

            def committed_forward():
                loss, head_grads = committed_model_loss(module, targets, spec, trainable, committed, frozen,
                                                        rows_part, step_rng, denominator, part_first_row)
                return jax.tree.map(lambda x: x * share, (loss, head_grads))

            if spec.head_gradient == "committed" or spec.log_every == 1:
                model_loss, head_grads = committed_forward()
            else:
                model_loss = jax.lax.cond(logged, lambda: committed_forward()[0], lambda: jnp.full((), jnp.nan))
                head_grads = None
            # Rows >= L of the slot gradients are zero (coefficient 0 in every forward): leave them out.
            rows = spec.live_slots
            return {"slots": jax.tree.map(lambda g: g[:rows], grads["slots"]), "losses": all_losses,
                    "model_loss": model_loss,
                    "head": grads["head"] if head_grads is None else head_grads}

        shard_rows = next(iter(batch.values())).shape[0]
        summed = accumulate_micro_batches(micro_terms, batch, spec.grad_accum_steps,
                                          jax.lax.axis_index(DATA_AXIS) * shard_rows)
        # The step's only collective: slot and head gradients, slot losses and the committed loss, in one all-reduce.
        summed = psum_packed(summed, (DATA_AXIS, COMPONENTS_AXIS))
        rows = spec.live_slots
        slot_grads = jax.tree.map(lambda g: jnp.pad(g, ((0, num_slots - rows), (0, 0))), summed["slots"])
        # On the whole slots (every device holds them), so neither needs a collective of its own.
        grads = {"slots": slot_grads, "head": summed["head"]}
        grads, penalty, scores = spec.impl.penalty_and_scores(trainable, grads, {"committed": committed},
                                                              method_state)
        return grads, summed["losses"], summed["model_loss"], penalty, scores

    sharded = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(P(), P(), P(), P(), P(), P(DATA_AXIS), P(COMPONENTS_AXIS), P(), P()),
        out_specs=(P(), P(), P(), P(), P()),
        check_vma=False,
    )
    slot_ids = jnp.arange(num_rows, dtype=jnp.int32)
    grads, slot_losses, loss, penalty, scores = sharded(trainable, snapshot, committed, live, frozen, batch,
                                                        slot_ids, step_rng, logged)
    if spec.head_gradient == "mean":
        grads = mean_head_gradient(grads, spec.live_slots)
    return grads, loss, slot_losses, penalty, scores


def refresh_snapshot(slots: Any, snapshot: Any, refresh: jax.Array) -> Any:
    """The snapshot after a step: a copy of ``slots`` where ``refresh``, else ``snapshot`` unchanged."""
    return jax.tree.map(lambda new, old: jnp.where(refresh, new, old), slots, snapshot)


def mean_head_gradient(grads: Mapping[str, Any], live_slots: int) -> dict[str, Any]:
    """The slots keep their own deflated gradient; the head gets the mean over the L live slot losses.

    The head sits in all L slot forwards, so the summed gradient would be L times a single model's (and would
    dominate the global-norm clip as L grows); the mean keeps its step size that of the lora / joint baselines.
    Every slot k < L is live in some module (slots are contiguous per module), so the mean is over L.
    """
    return {"slots": grads["slots"], "head": jax.tree.map(lambda g: g / live_slots, grads["head"])}


def committed_model_loss(module, targets, spec: StepSpec, trainable, committed, frozen, batch, rng, denominator,
                         first_row=None):
    """This data shard's loss of the committed-slot forward (what is evaluated) and its head gradient or None.

    The loss is the quantity the lora / joint baselines log (their one train forward), so training losses compare
    across methods; the deflated per-slot losses are logged as ``slot_losses``. With ``head_gradient="committed"``
    it is also the head's objective: its gradient w.r.t. the head only (slots held fixed), so the head is fit to
    the model that is evaluated and exported rather than to the mean of the partial "slots 0..k" models.
    """
    lora = masked_lora(targets, jax.lax.stop_gradient(trainable["slots"]), committed, spec.scaling, spec.padded_slots)

    def loss_fn(head):
        return _model_loss(module, spec, frozen, head, lora, batch, rng, denominator, first_row)

    if spec.head_gradient == "committed":
        return jax.value_and_grad(loss_fn)(trainable["head"])
    return jax.lax.stop_gradient(loss_fn(trainable["head"])), None


def _single_forward_grads(module, targets, spec: StepSpec, mesh: Mesh, trainable, alloc, method_state, frozen, batch,
                          step_rng):
    """One forward with every live slot row (every method but adapad), the rows' coefficients from the method's
    ``forward_coefs`` (so its singular values, gates and scales get their gradient); batch over ``data``,
    replicated over ``components``."""

    def body(trainable, alloc, method_state, frozen, batch, step_rng):
        denominator = jnp.maximum(psum_packed(_weight_sum(batch), DATA_AXIS), 1e-12)

        kernel_paths = [tuple(t.flax_path) + ("kernel",) for t in targets]

        def micro_terms(batch, first_row):
            def objective(trainable, kernels):
                coefs = spec.impl.forward_coefs(trainable, alloc, method_state, train=True)
                rows = spec.live_slots
                lora = to_lora_collection(targets, [a[:rows] for a in trainable["slots"]["a"]],
                                          [b[:rows] for b in trainable["slots"]["b"]],
                                          [coefs[m, :rows] for m in range(len(targets))])
                params = frozen if kernels is None else set_subtrees(frozen, dict(zip(kernel_paths, kernels)))
                return _model_loss(module, spec, params, trainable["head"], lora, batch, step_rng, denominator,
                                   first_row)

            if not spec.impl.weight_gradients:
                loss, grads = jax.value_and_grad(objective)(trainable, None)
                return grads, loss
            # dL/dW of each adapted (frozen) kernel, which is dL/d(delta W): the method's importance reads it.
            kernels = [_subtree(frozen, path) for path in kernel_paths]
            loss, (grads, weight_grads) = jax.value_and_grad(objective, argnums=(0, 1))(trainable, kernels)
            return {**grads, "weights": [g.astype(jnp.float32) for g in weight_grads]}, loss

        shard_rows = next(iter(batch.values())).shape[0]
        summed = accumulate_micro_batches(micro_terms, batch, spec.grad_accum_steps,
                                          jax.lax.axis_index(DATA_AXIS) * shard_rows)
        return psum_packed(summed, DATA_AXIS)

    sharded = jax.shard_map(
        body, mesh=mesh, in_specs=(P(), P(), P(), P(), P(DATA_AXIS), P()), out_specs=(P(), P()), check_vma=False
    )
    grads, loss = sharded(trainable, alloc, method_state, frozen, batch, step_rng)
    return grads, loss, loss[None]


def with_layer_remat(module: Any) -> Any:
    """``module`` with each layer recomputed in the backward pass (``adapter.remat``); same numbers, less memory.

    Rematerialising a whole slot's loss would not lower the peak (its backward needs every layer's residuals
    at once); per layer it holds one layer's activations plus the layer inputs.
    """
    if "remat" not in getattr(type(module), "__dataclass_fields__", {}):
        raise ValueError(f"adapter.remat: {type(module).__name__} has no layer-wise rematerialisation")
    return module.clone(remat=True)


def build_train_step(
    module, targets: Sequence[AdapterTarget], spec: StepSpec, mesh: Mesh, tx: optax.GradientTransformation,
    schedule: optax.Schedule,
) -> Callable:
    """The pure train step ``(state, frozen_params, batch) -> (state, metrics)`` for static ``spec``."""
    if spec.remat:
        module = with_layer_remat(module)

    method = spec.impl

    def train_step(state, frozen, batch):
        trainable, alloc = state["trainable"], state["alloc"]
        method_state = state.get("method", {})
        step_rng = jax.random.fold_in(state["rng"], state["step"])
        step = state["step"] + 1
        if method.deflated:
            logged = is_log_step(step, spec.log_every, spec.num_steps)
            grads, loss, slot_losses, penalty, scores = _adapad_grads(
                module, targets, spec, mesh, trainable, state["snapshot"], alloc, frozen, batch, step_rng, logged,
                method_state
            )
        else:
            grads, loss, slot_losses = _single_forward_grads(
                module, targets, spec, mesh, trainable, alloc, method_state, frozen, batch, step_rng
            )
            grads, penalty, scores = method.penalty_and_scores(trainable, grads, alloc, method_state)
            grads = {k: v for k, v in grads.items() if k != "weights"}  # read by the scores only

        live = method.live_mask(alloc, method_state)
        params = method.optimizer_params(trainable)
        updates, opt_state = tx.update(method.optimizer_params(grads), state["opt_state"], params, live=live)
        updates["slots"] = {
            part: [u * live[m][:, None].astype(u.dtype) for m, u in enumerate(rows)]
            for part, rows in updates["slots"].items()
        }
        updates = method.scale_updates(updates, state["step"], schedule(state["step"]), method_state)
        new_trainable = {**trainable, **optax.apply_updates(params, updates)}

        new_trainable, new_alloc, method_state, grew = method.after_update(
            new_trainable, grads, alloc, method_state, scores, step, jax.random.fold_in(step_rng, 0x5EED)
        )
        refresh = (step % spec.sync_every == 0) | grew
        snapshot = refresh_snapshot(new_trainable["slots"], state["snapshot"], refresh)
        new_state = {
            "step": step,
            "rng": state["rng"],
            "trainable": new_trainable,
            "opt_state": opt_state,
            "snapshot": snapshot,
            "alloc": new_alloc,
        }
        if "method" in state:
            new_state["method"] = method_state
        metrics = {
            "loss": loss,
            "slot_losses": slot_losses,
            "orth_penalty": penalty,
            "grad_norm": optax.global_norm(grads),
            "lr": schedule(state["step"]),
            "total_rank": new_alloc["rank"].sum(),
            "grew": grew,
        }
        return new_state, metrics

    return train_step


def build_eval_forward(module, targets: Sequence[AdapterTarget], method: Any, input_keys: tuple[str, ...]) -> Callable:
    """``(trainable, alloc, method_state, frozen, batch) -> model outputs`` of the evaluated (exported) model."""

    def forward(trainable, alloc, method_state, frozen, batch):
        coefs = method.forward_coefs(trainable, alloc, method_state, train=False)
        lora = to_lora_collection(targets, trainable["slots"]["a"], trainable["slots"]["b"],
                                  [coefs[m] for m in range(len(targets))])
        params = merge_head(frozen, trainable["head"])
        return module.apply({"params": params, "lora": lora}, **{k: batch[k] for k in input_keys}, deterministic=True)

    return forward
