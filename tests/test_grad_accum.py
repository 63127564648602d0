"""train.grad_accum_steps: micro-batches inside the jitted step give the full batch's update."""

import tempfile

import jax
import numpy as np
import pytest

from adapad_jax.training import Trainer, make_mesh
from adapad_jax.testing.toy import enable_compilation_cache, make_toy_model, planted_teacher, toy_batch, toy_config

enable_compilation_cache()

BATCH = 16


@pytest.fixture(scope="module")
def toy():
    model = make_toy_model(hidden=16, num_layers=2, num_outputs=4, adapter_dropout=0.2)
    return model, planted_teacher(model, [2, 1, 0, 0])


def _batches(model, teacher):
    """Two batches whose last rows weigh 0 (as the padded end of a data set): a mean of the micro-batches' own
    means would weight them differently from the full batch."""
    batches = [toy_batch(model, teacher, index, BATCH) for index in range(2)]
    for batch in batches:
        batch["example_weight"][-5:] = 0.0
    return batches


def _state_after(model, teacher, method, mesh, accum, **overrides):
    """The train state after two steps (the second grows a module) with ``grad_accum_steps=accum``; adapad runs
    its committed forward (the logged loss) only on step 2, the logged one."""
    cfg = toy_config(**{
        "adapter.method": method, "adapter.r_max": 4, "adapter.rank_budget": 6, "adapter.top_k": 1,
        "adapter.growth_interval": 1, "adapter.init_std": 0.1, "adapter.orth_reg": 0.1, "adapter.dropout": 0.2,
        "adapter.lora_rank": 2, "optim.warmup_steps": 0, "checkpoint.every_steps": 0,
        "train.grad_accum_steps": accum, "train.num_steps": 2, "train.log_every_steps": 2, **overrides,
    })
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model, cfg, make_mesh(*mesh), out)
        trainer.restore_or_init({})
        metrics = [jax.device_get(trainer.train_step(batch)) for batch in _batches(model, teacher)]
        state = jax.device_get(trainer.state)
        trainer.close()
    return state, metrics


def _assert_same(expected, actual):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(actual)):
        np.testing.assert_allclose(np.asarray(y, np.float64), np.asarray(x, np.float64), rtol=2e-5, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))


CASES = [pytest.param(method, mesh, accum, {}, id=f"{method}-mesh{mesh[0]}x{mesh[1]}-accum{accum}")
         for mesh, accum in (((1, 1), 2), ((2, 2), 4)) for method in ("adapad", "lora", "joint")]
# adapad's other head objective (the committed forward's gradient, every step) and its slots one at a time (a scan
# over slot chunks inside the scan over micro-batches).
CASES.append(pytest.param("adapad", (2, 1), 2, {"adapter.head_gradient": "committed", "adapter.slot_chunk_size": 1},
                          id="adapad-committed-head-chunked-mesh2x1-accum2"))


@pytest.mark.parametrize("method, mesh, accum, overrides", CASES)
def test_accumulated_step_equals_the_full_batch_step(toy, method, mesh, accum, overrides):
    """Params, optimiser moments, allocator EMAs, ranks and snapshot after two steps match grad_accum_steps=1.

    On the (data=2, components=2) mesh with 4 micro-batches each device's micro-batch is 2 rows, one per
    ``components`` device in adapad's committed forward."""
    model, teacher = toy
    full, full_metrics = _state_after(model, teacher, method, mesh, 1, **overrides)
    if method != "lora":
        assert full["alloc"]["rank"].sum() == len(model.targets) + 1, "the second step should grow one module"
    state, metrics = _state_after(model, teacher, method, mesh, accum, **overrides)
    assert int(state["step"]) == 2
    _assert_same(full, state)
    keys = ("loss", "slot_losses", "grad_norm", "lr")
    for ours, theirs in zip(metrics, full_metrics):
        _assert_same({k: theirs[k] for k in keys}, {k: ours[k] for k in keys})
