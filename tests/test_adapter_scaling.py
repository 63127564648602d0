"""The adapter scale s: alpha / r_max (adapad, joint) and alpha / lora_rank (lora), at sizes where alpha, alpha / r
and alpha * r all differ, and the trainer's forward against ``W + s * sum_j a_j b_j^T`` merged by hand."""

import jax
import numpy as np
import pytest

from adapad_jax.adapters.slots import init_slots
from adapad_jax.training import Trainer, make_mesh
from adapad_jax.testing.toy import enable_compilation_cache, make_toy_model, planted_teacher, toy_batch, toy_config

enable_compilation_cache()

ALPHA, R_MAX, LORA_RANK, INITIAL_RANK = 8.0, 4, 2, 3


@pytest.mark.parametrize("method, expected_scale", [("adapad", ALPHA / R_MAX), ("joint", ALPHA / R_MAX),
                                                    ("lora", ALPHA / LORA_RANK)])
def test_scale_is_alpha_over_rank_and_the_forward_adds_s_times_the_committed_deltas(tmp_path, method,
                                                                                    expected_scale):
    model = make_toy_model(hidden=16, num_layers=2, num_outputs=4)
    cfg = toy_config(**{"adapter.method": method, "adapter.alpha": ALPHA, "adapter.r_max": R_MAX,
                        "adapter.lora_rank": LORA_RANK, "adapter.initial_rank": INITIAL_RANK,
                        "adapter.rank_budget": 16, "checkpoint.every_steps": 0})
    trainer = Trainer(model, cfg, make_mesh(1, 1), tmp_path)
    assert trainer.scaling == expected_scale
    trainer.restore_or_init({})
    # Random a and b in every slot (lora starts with b = 0, which would hide the scale).
    slots = init_slots(model.targets, trainer.num_slots, 0.5, jax.random.PRNGKey(7))
    trainer.state = {**trainer.state, "trainable": {**trainer.state["trainable"], "slots": slots}}
    committed = np.asarray(trainer.state["alloc"]["committed"])
    rank = LORA_RANK if method == "lora" else INITIAL_RANK
    assert committed.sum(axis=1).tolist() == [rank] * len(model.targets)
    if method != "lora":
        assert np.asarray(trainer.state["alloc"]["reserve"]).any(), "the reserve must stay out of the forward"

    params = jax.tree.map(np.array, model.params)
    for m, target in enumerate(model.targets):
        node = params
        for name in target.flax_path:
            node = node[name]
        a, b = np.asarray(slots["a"][m], np.float64), np.asarray(slots["b"][m], np.float64)
        delta = sum(np.outer(a[j], b[j]) for j in range(trainer.num_slots) if committed[m, j])
        node["kernel"] = (node["kernel"].astype(np.float64) + expected_scale * delta).astype(np.float32)
    batch = toy_batch(model, planted_teacher(model, [1, 0, 0, 0]), 0, 8)
    want = model.module.apply({"params": params}, batch["input_ids"], batch["attention_mask"])["logits"]
    base = model.module.apply({"params": model.params}, batch["input_ids"], batch["attention_mask"])["logits"]
    got = trainer.predict(batch)["logits"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert np.abs(np.asarray(want) - np.asarray(base)).max() > 0.1, "the deltas should move the output"
    trainer.close()
