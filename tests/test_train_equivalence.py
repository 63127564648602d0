"""Trainer equivalences: adapad r_max=1 == rank-1 lora; (data=2, components=4) mesh == one device."""

import json
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adapad_jax.adapters.slots import masked_lora
from adapad_jax.training import Trainer, make_mesh
from adapad_jax.training.losses import loss_terms
from adapad_jax.testing.toy import ToyBatches, make_toy_model, planted_teacher, toy_batch, toy_config
from adapad_jax.testing.toy import enable_compilation_cache

enable_compilation_cache()


@pytest.fixture(scope="module")
def toy():
    model = make_toy_model(hidden=16, num_layers=2, num_outputs=4)
    return model, planted_teacher(model, [2, 1, 0, 0])


def _losses(out_dir):
    return [json.loads(line)["loss"] for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def _run(model, teacher, cfg, mesh, steps, out_dir, init_slots=None):
    trainer = Trainer(model, cfg, mesh, out_dir)
    data = ToyBatches(model, teacher, 16)
    trainer.restore_or_init(data.state())
    if init_slots is not None:
        slots = jax.device_put(init_slots, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        trainer.state = {**trainer.state, "trainable": {**trainer.state["trainable"], "slots": slots},
                         "snapshot": jax.tree.map(jnp.copy, slots)}
    trainer.train(data, steps, data.state, progress=False)
    return trainer


def test_adapad_rank_one_trains_like_lora(toy):
    model, teacher = toy
    common = {"adapter.alpha": 4.0, "adapter.init_std": 0.3, "checkpoint.every_steps": 0}
    with tempfile.TemporaryDirectory() as d1, tempfile.TemporaryDirectory() as d2:
        adapad = _run(model, teacher, toy_config(**common, **{"adapter.r_max": 1, "adapter.grow": False,
                                                               "adapter.rank_budget": 4}),
                      make_mesh(1, 1), 0, d1)
        init = jax.device_get(adapad.state["trainable"]["slots"])
        assert np.abs(init["b"][0]).max() > 0
        adapad.train(ToyBatches(model, teacher, 16), 6, lambda: {}, progress=False)
        lora = _run(model, teacher, toy_config(**common, **{"adapter.method": "lora", "adapter.lora_rank": 1}),
                    make_mesh(1, 1), 6, d2, init_slots=init)
        assert adapad.scaling == lora.scaling == 4.0
        np.testing.assert_allclose(_losses(d1), _losses(d2), rtol=1e-6)
        for x, y in zip(jax.tree.leaves(jax.device_get(adapad.state["trainable"])),
                        jax.tree.leaves(jax.device_get(lora.state["trainable"]))):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
        moved = np.abs(np.asarray(adapad.state["trainable"]["slots"]["a"][0]) - init["a"][0]).max()
        assert moved > 1e-4


def test_lora_starts_at_base_model_and_joint_trains_the_reserve_at_increlora_scale(toy):
    """joint's train forward holds the reserve at E = 1e-5 (IncreLoRA): it is the evaluated model up to E."""
    model, teacher = toy
    batch = toy_batch(model, teacher, 0, 16)
    base = model.module.apply({"params": model.params}, batch["input_ids"], batch["attention_mask"])
    base_loss = float(np.divide(*loss_terms(model.task, base, batch)))
    with tempfile.TemporaryDirectory() as d1, tempfile.TemporaryDirectory() as d2:
        lora = _run(model, teacher, toy_config(**{"adapter.method": "lora", "checkpoint.every_steps": 0}),
                    make_mesh(1, 1), 1, d1)
        np.testing.assert_allclose(_losses(d1)[0], base_loss, rtol=1e-6)
        joint = Trainer(model, toy_config(**{"adapter.method": "joint", "adapter.init_std": 0.3}), make_mesh(1, 1), d2)
        joint.restore_or_init({})
        state = jax.device_get(joint.state)
        committed, reserve = state["alloc"]["committed"], state["alloc"]["reserve"]
        assert reserve.any()

        def loss_with(weights):
            lora_c = masked_lora(model.targets, state["trainable"]["slots"], weights, joint.scaling)
            out = model.module.apply({"params": model.params, "lora": lora_c}, batch["input_ids"],
                                     batch["attention_mask"])
            return float(np.divide(*loss_terms(model.task, out, batch))), np.asarray(out["logits"])

        expected, _ = loss_with(committed.astype(np.float32) + 1e-5 * reserve.astype(np.float32))
        committed_loss, committed_logits = loss_with(committed)
        full_reserve, _ = loss_with(committed | reserve)
        joint.train(ToyBatches(model, teacher, 16), 3, lambda: {}, progress=False)  # step 1 has lr 0 (warmup)
        np.testing.assert_allclose(_losses(d2)[0], expected, rtol=1e-6)
        np.testing.assert_allclose(expected, committed_loss, rtol=1e-4)  # trained model == evaluated model, up to E
        assert abs(full_reserve - committed_loss) > 1e-3, "a full-scale reserve would change the model"
        assert abs(expected - base_loss) > 1e-4
        after = jax.device_get(joint.state)
        moved = np.abs(after["trainable"]["slots"]["a"][0] - state["trainable"]["slots"]["a"][0])
        assert moved[np.asarray(reserve[0])].max() > 1e-5, "the reserve trains"
        lora.close()
        joint.close()


def test_mesh_run_matches_single_device(toy):
    model, teacher = toy
    cfg = toy_config(**{"adapter.r_max": 4, "adapter.rank_budget": 9, "adapter.top_k": 2,
                        "adapter.growth_interval": 2, "adapter.init_std": 0.1, "adapter.orth_reg": 0.1,
                        "checkpoint.every_steps": 0})
    results = []
    for data, components in ((1, 1), (2, 4)):
        with tempfile.TemporaryDirectory() as out:
            trainer = _run(model, teacher, cfg, make_mesh(data, components), 5, out)
            slot_a = trainer.state["trainable"]["slots"]["a"][0]
            # the slots are replicated: every device builds its slots' deflated forwards from its own copy
            assert slot_a.sharding.is_fully_replicated
            assert len({shard.device for shard in slot_a.addressable_shards}) == data * components
            results.append((jax.device_get(trainer.state), _losses(out), sorted(trainer._steps)))
            trainer.close()
    (single, single_losses, single_steps), (mesh, mesh_losses, mesh_steps) = results
    assert [L for L, _ in single_steps][:2] == [2, 3], "expected an L recompile after the growth at step 4"
    assert single_steps == mesh_steps
    np.testing.assert_array_equal(single["alloc"]["rank"], mesh["alloc"]["rank"])
    assert int(single["alloc"]["rank"].sum()) > 4
    np.testing.assert_allclose(single_losses, mesh_losses, rtol=1e-5)
    for path, x, y in zip(*zip(*jax.tree_util.tree_leaves_with_path(single)), jax.tree.leaves(mesh)):
        assert_close_to_scale(x, y, jax.tree_util.keystr(path))


def assert_close_to_scale(x, y, name: str, tolerance: float = 1e-5) -> None:
    """x == y for integer / boolean leaves; float leaves within ``tolerance`` of the leaf's own scale (max |x|),
    so small-valued leaves (Adam's second moments, the allocator's EMAs, ~1e-7..1e-5) are compared, not waved
    through by an absolute tolerance larger than themselves."""
    x, y = np.asarray(x), np.asarray(y)
    if not np.issubdtype(x.dtype, np.floating):
        np.testing.assert_array_equal(x, y, err_msg=name)
        return
    scale = float(np.abs(x).max(initial=0.0))
    error = float(np.abs(x.astype(np.float64) - y.astype(np.float64)).max(initial=0.0))
    assert error <= tolerance * scale, (name, error, scale)




@pytest.mark.parametrize("mesh", [(1, 1), (1, 2)])
def test_adapad_computes_the_committed_loss_only_on_logged_steps(toy, mesh):
    """The committed forward (the logged ``loss``) runs on log steps and the last step only; the run is the
    same as logging every step (same state, same logged losses), and the other steps report NaN."""
    model, teacher = toy
    common = {"adapter.r_max": 4, "adapter.rank_budget": 9, "adapter.top_k": 2, "adapter.growth_interval": 2,
              "adapter.init_std": 0.1, "checkpoint.every_steps": 0}
    runs = {}
    for every in (1, 3):
        with tempfile.TemporaryDirectory() as out:
            trainer = _run(model, teacher, toy_config(**common, **{"train.log_every_steps": every}),
                           make_mesh(*mesh), 7, out)
            records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
            losses = {r["step"]: r["loss"] for r in records if "loss" in r}
            # one more step outside train(): step 8 is neither a multiple of 3 nor the last step
            extra = jax.device_get(trainer.train_step(next(ToyBatches(model, teacher, 16, start=7))))
            runs[every] = (jax.device_get(trainer.state["trainable"]), losses, extra)
            trainer.close()
    (every_step, all_losses, extra_1), (sparse, logged, extra_3) = runs[1], runs[3]
    assert sorted(logged) == [3, 6, 7] and sorted(all_losses) == list(range(1, 8))
    for step, loss in logged.items():
        np.testing.assert_allclose(loss, all_losses[step], rtol=1e-6)
    for x, y in zip(jax.tree.leaves(every_step), jax.tree.leaves(sparse)):
        np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-7)
    assert np.isfinite(extra_1["loss"]) and np.isnan(extra_3["loss"])
    np.testing.assert_allclose(extra_3["slot_losses"], extra_1["slot_losses"], rtol=1e-6)


@pytest.mark.parametrize("method", ["adapad", "lora"])
def test_dropout_masks_do_not_depend_on_the_data_split(method):
    """Dropout keys come from each example's global row: a (data=2, components=2) run equals one device's."""
    model = make_toy_model(hidden=16, num_layers=2, num_outputs=4, adapter_dropout=0.5)
    teacher = planted_teacher(model, [2, 1, 0, 0])
    common = {"adapter.method": method, "adapter.r_max": 4, "adapter.rank_budget": 9, "adapter.growth_interval": 2,
              "adapter.init_std": 0.1, "adapter.lora_rank": 2, "checkpoint.every_steps": 0}
    runs = {}
    for name, dropout, mesh in (("single", 0.5, (1, 1)), ("mesh", 0.5, (2, 2)), ("no_dropout", 0.0, (1, 1))):
        with tempfile.TemporaryDirectory() as out:
            trainer = _run(model, teacher, toy_config(**common, **{"adapter.dropout": dropout}), make_mesh(*mesh), 4,
                           out)
            assert trainer.use_dropout == (dropout > 0)
            runs[name] = (jax.device_get(trainer.state["trainable"]), _losses(out))
            trainer.close()
    np.testing.assert_allclose(runs["mesh"][1], runs["single"][1], rtol=1e-5)
    for x, y in zip(jax.tree.leaves(runs["single"][0]), jax.tree.leaves(runs["mesh"][0])):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)
    assert max(abs(a - b) for a, b in zip(runs["single"][1], runs["no_dropout"][1])) > 1e-4, "dropout should act"

def test_memory_knobs_do_not_change_the_run(toy):
    """slot_chunk_size (lax.scan over slot chunks) and remat (per-layer recompute) trade speed for memory only."""
    model, teacher = toy
    common = {"adapter.r_max": 4, "adapter.rank_budget": 9, "adapter.top_k": 2, "adapter.growth_interval": 2,
              "adapter.init_std": 0.1, "checkpoint.every_steps": 0}
    results = []
    for knobs, mesh in (({}, (1, 1)), ({"adapter.slot_chunk_size": 1, "adapter.remat": True}, (1, 1)),
                        ({"adapter.slot_chunk_size": 1, "adapter.remat": True}, (1, 2))):
        with tempfile.TemporaryDirectory() as out:
            trainer = _run(model, teacher, toy_config(**common, **knobs), make_mesh(*mesh), 5, out)
            results.append((jax.device_get(trainer.state["trainable"]), _losses(out)))
            trainer.close()
    (ref, ref_losses), *others = results
    for trainable, losses in others:
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
        for x, y in zip(jax.tree.leaves(ref), jax.tree.leaves(trainable)):
            np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)
    assert max(abs(a - b) for a, b in zip(ref_losses, ref_losses[1:])) > 1e-5, "the run should train"

def test_mesh_and_config_errors_name_the_problem(toy, tmp_path):
    model, _ = toy
    with pytest.raises(ValueError, match=r"mesh.data=4 x mesh.components=4 = 16 devices, but only 8"):
        make_mesh(4, 4)
    with pytest.raises(ValueError, match=r"mesh.components=3 does not divide adapter.r_max=4"):
        make_mesh(1, 3, r_max=4)
    with pytest.raises(ValueError, match=r"mesh.components=3 does not divide adapter.r_max=4"):
        Trainer(model, toy_config(), make_mesh(1, 3), tmp_path)
    with pytest.raises(ValueError, match=r"rank_budget=3 is below the 4 adapted modules x adapter.initial_rank=1 = 4"):
        Trainer(model, toy_config(**{"adapter.rank_budget": 3}), make_mesh(1, 1), tmp_path)
    with pytest.raises(ValueError, match="adapter.method"):
        Trainer(model, toy_config(**{"adapter.method": "dora"}), make_mesh(1, 1), tmp_path)
    with pytest.raises(ValueError, match="adapter.importance"):
        Trainer(model, toy_config(**{"adapter.importance": "magnitude"}), make_mesh(1, 1), tmp_path)
    with pytest.raises(ValueError, match="optim.schedule"):
        Trainer(model, toy_config(**{"optim.schedule": "step"}), make_mesh(1, 1), tmp_path)
    trainer = Trainer(model, toy_config(), make_mesh(2, 1), tmp_path)
    trainer.restore_or_init({})
    with pytest.raises(ValueError, match="batch size 7 is not divisible by mesh.data=2"):
        trainer.train_step({"input_ids": np.zeros((7, 4), np.int32), "attention_mask": np.ones((7, 4), np.int32),
                            "labels": np.zeros((7, 4), np.float32)})


def test_schedule_and_separate_weight_decay():
    import ml_collections

    from adapad_jax.training.optim import learning_rate_schedule, make_optimizer

    linear = learning_rate_schedule(1.0, 10, 110, "linear")
    np.testing.assert_allclose([linear(0), linear(5), linear(10), linear(60), linear(110)], [0, 0.5, 1, 0.5, 0],
                               atol=1e-6)
    cosine = learning_rate_schedule(2.0, 0, 100, "cosine")
    np.testing.assert_allclose([cosine(0), cosine(50), cosine(100)], [2.0, 1.0, 0.0], atol=1e-5)
    optim = ml_collections.ConfigDict({"learning_rate": 0.5, "warmup_steps": 0, "schedule": "linear",
                                       "grad_clip": 1.0, "b1": 0.9, "b2": 0.999, "eps": 1e-6,
                                       "weight_decay": 0.1, "adapter_weight_decay": 0.01})
    tx, _ = make_optimizer(optim, 100)
    params = {"slots": {"a": [jnp.full((2, 3), 2.0)]}, "head": {"head": {"kernel": jnp.full((3,), 4.0)}}}
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(updates["slots"]["a"][0], -0.5 * 0.01 * 2.0, rtol=1e-6)
    np.testing.assert_allclose(updates["head"]["head"]["kernel"], -0.5 * 0.1 * 4.0, rtol=1e-6)
