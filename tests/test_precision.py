"""The frozen backbone in bf16 for bf16 models: same loss and gradients as fp32 storage, half the bytes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from adapad_jax.models.registry import model_from_config
from adapad_jax.testing import tiny
from adapad_jax.training.precision import frozen_storage


def _loss_and_grads(model, params, ids, mask):
    rng = np.random.default_rng(1)
    lora = traverse_util.unflatten_dict({
        t.flax_path + (k,): v for t in model.targets for k, v in {
            "a": jnp.asarray(rng.normal(0, 0.3, (2, t.in_features)), jnp.float32),
            "b": jnp.asarray(rng.normal(0, 0.3, (2, t.out_features)), jnp.float32),
            "coef": jnp.ones((2,), jnp.float32)}.items()})

    def loss(lora):
        out = model.module.apply({"params": params, "lora": lora}, input_ids=ids, attention_mask=mask,
                                 deterministic=True)
        return sum(jnp.sum(jnp.square(v.astype(jnp.float32))) for v in out.values())

    return jax.jit(jax.value_and_grad(loss))(lora)


@pytest.mark.parametrize("family", ["qwen3", "deberta"])
def test_bf16_storage_gives_the_same_loss_and_gradients_as_fp32(family):
    config = tiny.tiny_qwen3_config() if family == "qwen3" else tiny.tiny_deberta_config()
    task = "qa" if family == "qwen3" else "classification"
    model = model_from_config(config, task=task, num_labels=2, dtype=jnp.bfloat16, seed=2)
    stored = frozen_storage(model.params, jnp.bfloat16)
    flat, flat_stored = traverse_util.flatten_dict(model.params), traverse_util.flatten_dict(stored)
    cast = [path for path, leaf in flat_stored.items() if leaf.dtype == jnp.bfloat16]
    assert any(path[-1] == "kernel" for path in cast) and any(path[-1] == "embedding" for path in cast)
    assert all(flat[path].dtype == np.float32 for path in flat)
    saved = sum(flat[p].nbytes for p in cast) / 2
    assert saved > 0.3 * sum(leaf.nbytes for leaf in flat.values())
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(3, 60, size=(2, 12)), jnp.int32)
    mask = jnp.asarray(np.array([[1] * 12, [1] * 8 + [0] * 4]), jnp.int32)
    want_loss, want_grads = _loss_and_grads(model, model.params, ids, mask)
    got_loss, got_grads = _loss_and_grads(model, stored, ids, mask)
    assert float(got_loss) == float(want_loss)
    jax.tree.map(lambda g, w: np.testing.assert_array_equal(np.asarray(g), np.asarray(w)), got_grads, want_grads)


def test_fp32_models_keep_fp32_storage():
    model = model_from_config(tiny.tiny_qwen3_config(), task="qa", num_labels=2, seed=2)
    assert frozen_storage(model.params, jnp.float32) is model.params


def test_trainer_holds_bf16_frozen_weights_and_exports_fp32():
    from adapad_jax.training.sharding import make_mesh
    from adapad_jax.testing.toy import toy_config
    from adapad_jax.training.trainer import Trainer
    import tempfile

    model = model_from_config(tiny.tiny_qwen3_config(), task="qa", num_labels=2, dtype=jnp.bfloat16, seed=2)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model, toy_config(**{"checkpoint.every_steps": 0, "adapter.method": "lora", "adapter.lora_rank": 1}), make_mesh(1, 1), out)
        trainer.restore_or_init({})
        frozen = traverse_util.flatten_dict(trainer.frozen)
        kernels = [leaf for path, leaf in frozen.items() if path[-1] == "kernel"]
        assert kernels and all(leaf.dtype == jnp.bfloat16 for leaf in kernels)
        exported = traverse_util.flatten_dict(trainer.trained_params())
        assert all(np.asarray(leaf).dtype == np.float32 for leaf in exported.values())
        for path, leaf in traverse_util.flatten_dict(model.params).items():
            if path[0] != "qa_outputs":
                np.testing.assert_array_equal(exported[path], leaf)
        trainer.close()
