"""Self-correction: the stop-gradient snapshot refreshes every ``sync_every`` steps and on growth, and each slot's
deflation target is the refreshed predecessors (checked against a model with the deltas merged by hand)."""

import jax
import jax.numpy as jnp
import numpy as np

from adapad_jax.training import Trainer, make_mesh
from adapad_jax.training.losses import loss_terms
from adapad_jax.testing.toy import enable_compilation_cache, make_toy_model, planted_teacher, toy_batch, toy_config

enable_compilation_cache()

SYNC_EVERY, GROWTH_INTERVAL, STEPS = 3, 2, 8


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _explicit_slot_loss(model, batch, state, scaling, k):
    """Slot k's deflated loss, merged by hand: W + s (sum_{j<k} committed_j snap_j + live_k slot_k)."""
    snapshot, slots, alloc = state["snapshot"], state["trainable"]["slots"], state["alloc"]
    live = alloc["committed"] | alloc["reserve"]
    params = jax.tree.map(np.array, model.params)
    params["head"] = state["trainable"]["head"]["head"]
    for m, target in enumerate(model.targets):
        node = params
        for name in target.flax_path:
            node = node[name]
        delta = sum(alloc["committed"][m, j] * np.outer(snapshot["a"][m][j], snapshot["b"][m][j]) for j in range(k))
        delta = delta + live[m, k] * np.outer(slots["a"][m][k], slots["b"][m][k])
        node["kernel"] = (node["kernel"].astype(np.float64) + scaling * delta).astype(np.float32)
    out = model.module.apply({"params": params}, batch["input_ids"], batch["attention_mask"])
    return float(np.divide(*loss_terms(model.task, out, batch)))


def test_snapshot_refreshes_on_sync_and_growth_and_is_the_deflation_target(tmp_path):
    model = make_toy_model(hidden=16, num_layers=2, num_outputs=4)
    teacher = planted_teacher(model, [2, 1, 0, 1])
    cfg = toy_config(**{"adapter.r_max": 4, "adapter.rank_budget": 12, "adapter.top_k": 2,
                        "adapter.growth_interval": GROWTH_INTERVAL, "adapter.sync_every": SYNC_EVERY,
                        "adapter.init_std": 0.3, "optim.warmup_steps": 0, "train.num_steps": STEPS,
                        "checkpoint.every_steps": 0})
    trainer = Trainer(model, cfg, make_mesh(1, 1), tmp_path)
    trainer.restore_or_init({})
    before = _host(trainer.state)
    refreshed, kept = [], []
    for step in range(1, STEPS + 1):
        batch = toy_batch(model, teacher, step, 16)
        metrics = _host(trainer.train_step(batch))
        after = _host(trainer.state)
        # The deflated losses of this step were taken against the snapshot the previous step left.
        for k in range(int(np.asarray(metrics["slot_losses"]).shape[0])):
            np.testing.assert_allclose(metrics["slot_losses"][k],
                                       _explicit_slot_loss(model, batch, before, trainer.scaling, k), rtol=2e-5)
        grew = bool(metrics["grew"])
        assert grew == (step >= 2 * GROWTH_INTERVAL and step % GROWTH_INTERVAL == 0), step
        slots_moved = any(np.abs(x - y).max() > 1e-6 for x, y in zip(jax.tree.leaves(after["trainable"]["slots"]),
                                                                     jax.tree.leaves(before["trainable"]["slots"])))
        assert slots_moved, step
        if step % SYNC_EVERY == 0 or grew:
            refreshed.append(step)
            for x, y in zip(jax.tree.leaves(after["snapshot"]), jax.tree.leaves(after["trainable"]["slots"])):
                np.testing.assert_array_equal(x, y)
        else:
            kept.append(step)
            for x, y in zip(jax.tree.leaves(after["snapshot"]), jax.tree.leaves(before["snapshot"])):
                np.testing.assert_array_equal(x, y)
        before = after
    # Sync at 3 and 6, growth at 4, 6 and 8: both causes of a refresh occur, and steps in between keep it.
    assert refreshed == [3, 4, 6, 8] and kept == [1, 2, 5, 7]
    trainer.close()
