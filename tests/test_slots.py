"""Deflated slot forward: gradients per slot, and the committed-only evaluation forward."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adapad_jax.adapters.slots import deflated_lora, init_slots, masked_lora
from adapad_jax.methods import allocator as alloc_lib
from adapad_jax.training.losses import loss_terms
from adapad_jax.training.sharding import make_mesh
from adapad_jax.training.step import StepSpec, _adapad_grads, merge_head
from adapad_jax.methods.adapad import AdaPaD
from adapad_jax.testing.toy import make_toy_model, planted_teacher, toy_batch
from adapad_jax.testing.toy import enable_compilation_cache

enable_compilation_cache()

R_MAX = 4
SCALING = 2.0


def _merged_params(model, slot_rows):
    """Kernels with explicit deltas: slot_rows[m] = list of (coef, a [in], b [out])."""
    out = jax.tree.map(jnp.asarray, model.params)
    for target, rows in zip(model.targets, slot_rows):
        node = out
        for name in target.flax_path:
            node = node[name]
        for coef, a, b in rows:
            node["kernel"] = node["kernel"] + coef * jnp.outer(a, b)
    return out


def _adapad(model):
    """AdaPaD's rules for the step at R_MAX slots and scale SCALING (what the Trainer builds from a config)."""
    settings = types.SimpleNamespace(
        r_max=R_MAX, grow=True, rank_budget=100, initial_rank=1, alpha=SCALING * R_MAX, advance_learning=True,
        top_k=1, growth_interval=5, ema_beta1=0.85, ema_beta2=0.85, importance="score", orth_reg=0.0, init_std=0.3)
    return AdaPaD(settings, model.targets)


def _setup():
    model = make_toy_model(hidden=16, num_layers=2, num_outputs=4)
    teacher = planted_teacher(model, [2, 1, 0, 1])
    batch = {k: jnp.asarray(v) for k, v in toy_batch(model, teacher, 0, 8).items()}
    key = jax.random.PRNGKey(3)
    slots = init_slots(model.targets, R_MAX, 0.3, key)
    snapshot = init_slots(model.targets, R_MAX, 0.3, jax.random.fold_in(key, 7))
    rank = jnp.array([2, 1, 3, 1], jnp.int32)
    committed, reserve = alloc_lib.masks_from_rank(rank, R_MAX, jnp.asarray(5))
    return model, batch, slots, snapshot, committed, reserve


def _explicit_slot_loss(model, batch, slots, snapshot, committed, live, k, a_k, b_k):
    rows = []
    for m in range(len(model.targets)):
        mod_rows = [(SCALING * float(committed[m, j]), snapshot["a"][m][j], snapshot["b"][m][j]) for j in range(k)]
        mod_rows.append((SCALING * float(live[m, k]), a_k[m], b_k[m]))
        rows.append(mod_rows)
    outputs = model.module.apply({"params": _merged_params(model, rows)}, batch["input_ids"], batch["attention_mask"])
    num, den = loss_terms(model.task, outputs, batch)
    return num / den


def test_slot_gradient_reaches_only_its_slot_and_matches_explicit_model():
    model, batch, slots, snapshot, committed, reserve = _setup()
    live = committed | reserve
    head = {"head": jax.tree.map(jnp.asarray, model.params["head"])}
    for k in range(R_MAX):
        def slot_loss(slots_):
            lora = deflated_lora(model.targets, slots_, snapshot, committed, live, jnp.asarray(k), SCALING, R_MAX)
            params = merge_head(model.params, head)
            out = model.module.apply({"params": params, "lora": lora}, batch["input_ids"], batch["attention_mask"])
            num, den = loss_terms(model.task, out, batch)
            return num / den

        loss, grads = jax.value_and_grad(slot_loss)(slots)
        a_k = [slots["a"][m][k] for m in range(4)]
        b_k = [slots["b"][m][k] for m in range(4)]
        ref_loss, (ga, gb) = jax.value_and_grad(
            lambda a, b: _explicit_slot_loss(model, batch, slots, snapshot, committed, live, k, a, b), argnums=(0, 1)
        )(a_k, b_k)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        for m in range(4):
            other = np.delete(np.arange(R_MAX), k)
            assert np.all(np.asarray(grads["a"][m])[other] == 0.0), (k, m)
            assert np.all(np.asarray(grads["b"][m])[other] == 0.0), (k, m)
            np.testing.assert_allclose(grads["a"][m][k], ga[m], rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(grads["b"][m][k], gb[m], rtol=1e-4, atol=1e-5)
            if live[m, k]:
                assert np.abs(np.asarray(ga[m])).sum() > 0


def test_sharded_step_slot_gradients_are_the_per_slot_gradients():
    model, batch, slots, snapshot, committed, reserve = _setup()
    alloc = {"committed": committed, "reserve": reserve}
    live = committed | reserve
    cfg = alloc_lib.AllocatorConfig(r_max=R_MAX, top_k=1, growth_interval=5)
    spec = StepSpec(method="adapad", task=model.task, scaling=SCALING, live_slots=4, padded_slots=4,
                    advance_learning=True, orth_reg=0.0, sync_every=5, slot_chunk_size=0, remat=False,
                    use_dropout=False, input_keys=("input_ids", "attention_mask"), alloc=cfg, impl=_adapad(model))
    head = {"head": jax.tree.map(jnp.asarray, model.params["head"])}
    trainable = {"slots": slots, "head": head}
    for mesh, chunk in ((make_mesh(1, 1), 0), (make_mesh(2, 4), 0), (make_mesh(1, 2), 1)):
        spec_m = spec.__class__(**{**spec.__dict__, "slot_chunk_size": chunk, "remat": chunk > 0})
        grads, loss, slot_losses, _, importance = jax.jit(
            lambda tr: _adapad_grads(model.module, model.targets, spec_m, mesh, tr, snapshot, alloc,
                                     jax.tree.map(jnp.asarray, model.params), batch, jax.random.PRNGKey(0),
                                     logged=jnp.asarray(True))
        )(trainable)
        ref_grads = {"a": [np.zeros_like(a) for a in slots["a"]], "b": [np.zeros_like(b) for b in slots["b"]]}
        for k in range(R_MAX):
            a_k = [slots["a"][m][k] for m in range(4)]
            b_k = [slots["b"][m][k] for m in range(4)]
            ref_loss, (ga, gb) = jax.value_and_grad(
                lambda a, b: _explicit_slot_loss(model, batch, slots, snapshot, committed, live, k, a, b),
                argnums=(0, 1))(a_k, b_k)
            np.testing.assert_allclose(slot_losses[k], ref_loss, rtol=1e-5)
            for m in range(4):
                np.testing.assert_allclose(grads["slots"]["a"][m][k], ga[m], rtol=1e-4, atol=1e-5)
                np.testing.assert_allclose(grads["slots"]["b"][m][k], gb[m], rtol=1e-4, atol=1e-5)
                ref_grads["a"][m][k], ref_grads["b"][m][k] = ga[m], gb[m]
        # the allocator's importance, computed inside the sharded body, is |theta * grad| of the reference gradients
        np.testing.assert_allclose(importance, alloc_lib.module_importance(slots, ref_grads, committed), rtol=1e-4)


def test_eval_forward_uses_committed_slots_only():
    model, batch, slots, _, committed, reserve = _setup()
    assert bool(reserve.any())
    lora = masked_lora(model.targets, slots, committed, SCALING)
    out = model.module.apply({"params": model.params, "lora": lora}, batch["input_ids"], batch["attention_mask"])
    rows = [[(SCALING, slots["a"][m][j], slots["b"][m][j]) for j in range(R_MAX) if committed[m, j]] for m in range(4)]
    ref = model.module.apply({"params": _merged_params(model, rows)}, batch["input_ids"], batch["attention_mask"])
    np.testing.assert_allclose(out["logits"], ref["logits"], rtol=1e-5, atol=1e-6)
    with_reserve = [[(SCALING, slots["a"][m][j], slots["b"][m][j]) for j in range(R_MAX)
                     if committed[m, j] or reserve[m, j]] for m in range(4)]
    ref_res = model.module.apply({"params": _merged_params(model, with_reserve)}, batch["input_ids"],
                                 batch["attention_mask"])
    assert np.abs(np.asarray(ref_res["logits"]) - np.asarray(out["logits"])).max() > 1e-3


@pytest.mark.parametrize("bad", [-1, 5])
def test_initial_rank_out_of_range_is_rejected(bad):
    with pytest.raises(ValueError, match="initial_rank"):
        alloc_lib.init_allocator(4, R_MAX, bad, 100)


def test_head_gets_the_mean_of_per_slot_head_gradients_and_loss_is_the_committed_forward():
    """L live slots: head gradient = mean over slots of each slot loss's head gradient; loss = committed model's."""
    model, batch, slots, snapshot, committed, reserve = _setup()
    alloc = {"committed": committed, "reserve": reserve}
    live = committed | reserve
    cfg = alloc_lib.AllocatorConfig(r_max=R_MAX, top_k=1, growth_interval=5)
    spec = StepSpec(method="adapad", task=model.task, scaling=SCALING, live_slots=4, padded_slots=4,
                    advance_learning=True, orth_reg=0.0, sync_every=5, slot_chunk_size=1, remat=False,
                    use_dropout=False, input_keys=("input_ids", "attention_mask"), alloc=cfg, impl=_adapad(model))
    head = {"head": jax.tree.map(jnp.asarray, model.params["head"])}
    frozen = jax.tree.map(jnp.asarray, model.params)
    grads, loss, *_ = jax.jit(
        lambda tr: _adapad_grads(model.module, model.targets, spec, make_mesh(1, 2), tr, snapshot, alloc, frozen,
                                 batch, jax.random.PRNGKey(0), logged=jnp.asarray(True))
    )({"slots": slots, "head": head})

    def slot_loss(head_, k):
        lora = deflated_lora(model.targets, slots, snapshot, committed, live, jnp.asarray(k), SCALING, R_MAX)
        out = model.module.apply({"params": merge_head(model.params, head_), "lora": lora}, batch["input_ids"],
                                 batch["attention_mask"])
        num, den = loss_terms(model.task, out, batch)
        return num / den

    per_slot = [jax.grad(slot_loss)(head, k) for k in range(R_MAX)]
    for got, *each in zip(jax.tree.leaves(grads["head"]), *(jax.tree.leaves(g) for g in per_slot)):
        np.testing.assert_allclose(got, np.mean(each, axis=0), rtol=1e-4, atol=1e-6)
        assert not np.allclose(got, np.sum(each, axis=0), rtol=1e-3), "the sum rule should differ"
    committed_out = model.module.apply(
        {"params": model.params, "lora": masked_lora(model.targets, slots, committed, SCALING)},
        batch["input_ids"], batch["attention_mask"])
    np.testing.assert_allclose(loss, np.divide(*loss_terms(model.task, committed_out, batch)), rtol=1e-5)


def test_committed_head_gradient_is_the_committed_forward_gradient_and_slots_keep_theirs():
    """head_gradient="committed": head grad = jax.grad of the committed forward's loss; slot grads as with "mean"."""
    model, batch, slots, snapshot, committed, reserve = _setup()
    alloc = {"committed": committed, "reserve": reserve}
    cfg = alloc_lib.AllocatorConfig(r_max=R_MAX, top_k=1, growth_interval=5)
    spec = StepSpec(method="adapad", task=model.task, scaling=SCALING, live_slots=4, padded_slots=4,
                    advance_learning=True, orth_reg=0.0, sync_every=5, slot_chunk_size=0, remat=False,
                    use_dropout=False, input_keys=("input_ids", "attention_mask"), alloc=cfg,
                    head_gradient="committed", impl=_adapad(model))
    mean_spec = spec.__class__(**{**spec.__dict__, "head_gradient": "mean"})
    head = {"head": jax.tree.map(jnp.asarray, model.params["head"])}
    frozen = jax.tree.map(jnp.asarray, model.params)

    def run(spec_, mesh):
        return jax.jit(
            lambda tr: _adapad_grads(model.module, model.targets, spec_, mesh, tr, snapshot, alloc, frozen, batch,
                                     jax.random.PRNGKey(0), logged=jnp.asarray(True))
        )({"slots": slots, "head": head})

    def committed_loss(head_):
        out = model.module.apply(
            {"params": merge_head(model.params, head_), "lora": masked_lora(model.targets, slots, committed, SCALING)},
            batch["input_ids"], batch["attention_mask"])
        num, den = loss_terms(model.task, out, batch)
        return num / den

    ref_loss, ref_head = jax.value_and_grad(committed_loss)(head)
    mean_grads, *_ = run(mean_spec, make_mesh(1, 1))
    for mesh in (make_mesh(1, 1), make_mesh(2, 2)):
        grads, loss, *_ = run(spec, mesh)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        for got, want, mean in zip(jax.tree.leaves(grads["head"]), jax.tree.leaves(ref_head),
                                   jax.tree.leaves(mean_grads["head"])):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
            assert not np.allclose(got, mean, rtol=1e-3, atol=1e-6), "the mean rule should differ"
        for got, want in zip(jax.tree.leaves(grads["slots"]), jax.tree.leaves(mean_grads["slots"])):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
