"""Adam with per-slot bias correction: a slot activated late gets a fresh Adam's first update."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adapad_jax.training import Trainer, make_mesh
from adapad_jax.training.slot_adam import SlotAdamState, scale_by_slot_adam
from adapad_jax.testing.toy import ToyBatches, enable_compilation_cache, make_toy_model, planted_teacher, toy_config

enable_compilation_cache()

B1, B2, EPS = 0.9, 0.999, 1e-6


def _tree(key, scale=1.0):
    ka, kb, kh = jax.random.split(key, 3)
    return {"slots": {"a": [scale * jax.random.normal(ka, (3, 5))], "b": [scale * jax.random.normal(kb, (3, 4))]},
            "head": {"w": scale * jax.random.normal(kh, (4,))}}


def _fresh_adam(grads):
    """Hand-written Adam from zero moments over ``grads`` (numpy); returns each step's update."""
    mu = nu = 0.0
    out = []
    for t, g in enumerate(grads, start=1):
        mu = B1 * mu + (1 - B1) * g
        nu = B2 * nu + (1 - B2) * g * g
        out.append((mu / (1 - B1**t)) / (np.sqrt(nu / (1 - B2**t)) + EPS))
    return out


def test_all_live_equals_optax_adam():
    tx, ref = scale_by_slot_adam(B1, B2, EPS), optax.scale_by_adam(B1, B2, EPS)
    params = _tree(jax.random.PRNGKey(0))
    state, ref_state = tx.init(params), ref.init(params)
    for step in range(3):
        grads = _tree(jax.random.PRNGKey(10 + step))
        upd, state = tx.update(grads, state, params, live=jnp.ones((1, 3), bool))
        ref_upd, ref_state = ref.update(grads, ref_state, params)
        for x, y in zip(jax.tree.leaves(upd), jax.tree.leaves(ref_upd)):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_late_slot_gets_fresh_adam_updates():
    """Slot 2 is off for 5 steps, then live: its updates are a fresh Adam's, not optax's global-count ones."""
    tx = jax.jit(scale_by_slot_adam(B1, B2, EPS).update)
    params = _tree(jax.random.PRNGKey(0))
    state = scale_by_slot_adam(B1, B2, EPS).init(params)
    off = jnp.array([[True, True, False]])
    late = []
    for step in range(8):
        grads = _tree(jax.random.PRNGKey(20 + step), scale=0.01 + step)
        live = off if step < 5 else jnp.ones((1, 3), bool)
        if step < 5:  # a slot that is not live has no gradient
            grads["slots"] = jax.tree.map(lambda g: g.at[2].set(0.0), grads["slots"])
        upd, state = tx(grads, state, params, live=live)
        if step < 5:
            assert np.all(np.asarray(upd["slots"]["a"][0])[2] == 0)
        else:
            late.append((np.asarray(grads["slots"]["a"][0])[2], np.asarray(upd["slots"]["a"][0])[2]))
    np.testing.assert_array_equal(state.slot_count, [[8, 8, 3]])
    assert int(state.count) == 8
    expected = _fresh_adam([g for g, _ in late])
    for (_, got), want in zip(late, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.abs(late[0][1]), 1.0, rtol=1e-3)  # g / (|g| + eps)
    # optax's one global count bias-corrects the late slot as if it had 6 steps behind it (0.52x here; ~3.2x at
    # step 500): the per-slot count is what makes the difference.
    ref = optax.scale_by_adam(B1, B2, EPS)
    ref_state = ref.init(params)
    for step in range(6):
        grads = _tree(jax.random.PRNGKey(20 + step), scale=0.01 + step)
        if step < 5:
            grads["slots"] = jax.tree.map(lambda g: g.at[2].set(0.0), grads["slots"])
        ref_upd, ref_state = ref.update(grads, ref_state, params)
    assert np.abs(np.abs(np.asarray(ref_upd["slots"]["a"][0])[2]) - np.abs(late[0][1])).min() > 0.3

def test_trainer_counts_each_slot_from_its_activation(tmp_path):
    """Without advance learning a promoted slot goes live the step after its growth step: its count starts there."""
    model = make_toy_model(hidden=16, num_layers=2, num_outputs=4)
    teacher = planted_teacher(model, [2, 1, 0, 0])
    cfg = toy_config(**{"adapter.growth_interval": 2, "adapter.advance_learning": False, "adapter.rank_budget": 6,
                        "adapter.top_k": 2, "checkpoint.every_steps": 0})
    trainer = Trainer(model, cfg, make_mesh(1, 2), tmp_path)
    data = ToyBatches(model, teacher, 16)
    trainer.restore_or_init(data.state())
    trainer.train(data, 6, data.state, progress=False)
    (state,) = [s for s in jax.tree.leaves(trainer.state["opt_state"], is_leaf=lambda x: isinstance(x, SlotAdamState))
                if isinstance(s, SlotAdamState)]
    rank = np.asarray(trainer.state["alloc"]["rank"])
    counts = np.asarray(state.slot_count)
    assert sorted(rank.tolist()) == [1, 1, 2, 2]
    np.testing.assert_array_equal(counts[:, 0], 6)
    np.testing.assert_array_equal(counts[:, 1], np.where(rank == 2, 2, 0))  # promoted after step 4
    assert int(state.count) == 6
    trainer.close()
