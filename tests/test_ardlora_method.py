"""ARD-LoRA on the method seam (``adapter.method=ardlora``): the trainer's step against a hand derivation, ranks
following alpha, bit-exact resume, PEFT export on tiny DeBERTaV3 and Qwen3, and refused settings.

The rules (effective rank, straight-through mask, l1 + TV) are checked alone in ``test_ardlora_rules.py``; here
every expected number is re-derived with NumPy from the abstract's formulas and our documented choices
(docs/methods/ardlora.md): rank ``clip(floor(r0 alpha + 0.5), 1, r_max)``, soft mask
``sigmoid((r0 alpha - k + 0.5) / tau)``, TV along layers per module type, scale ``adapter.alpha / r_max``.
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers_hf import assert_peft_reproduces_predict, hf_batch
from adapad_jax.run.core import export_trainer
from adapad_jax.adapters.slots import to_lora_collection
from adapad_jax.config.schema import ConfigError
from adapad_jax.training import Trainer, make_mesh
from adapad_jax.training.losses import loss_terms
from adapad_jax.training.slot_adam import SlotAdamState
from adapad_jax.training.step import merge_head
from adapad_jax.testing.toy import (ToyBatches, enable_compilation_cache, make_toy_model, planted_teacher, toy_batch,
                                   toy_config)

enable_compilation_cache()

R_MAX, ALPHA = 4, 8.0
SCALE = ALPHA / R_MAX


def _config(**overrides):
    base = {"adapter.method": "ardlora", "adapter.r_max": R_MAX, "adapter.alpha": ALPHA, "adapter.init_std": 0.1,
            "optim.learning_rate": 1e-2, "optim.warmup_steps": 0, "checkpoint.every_steps": 0}
    return toy_config(**{**base, **overrides})


def _trainer(model, tmp_path, **overrides):
    trainer = Trainer(model, _config(**overrides), make_mesh(1, 1), tmp_path)
    trainer.restore_or_init({"position": 0})
    return trainer


def _hand_rank(alpha, r0, r_max=R_MAX):
    return np.clip(np.floor(r0 * np.asarray(alpha, np.float64) + 0.5), 1, r_max).astype(int)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _module_alpha(alpha_grid):
    """Toy modules are toy.layers.{i}.{fc_in, fc_out}: module m = (layer m // 2, type m % 2) of the grid."""
    grid = np.asarray(alpha_grid)
    return np.array([grid[m // 2, m % 2] for m in range(4)])


def _set_alpha(trainer, grid, r0):
    """Put a chosen alpha in the state, with the rank record it implies (derived by hand, not by the method)."""
    state = jax.device_get(trainer.state)
    rank = _hand_rank(_module_alpha(grid), r0)
    alloc = dict(state["alloc"], rank=rank.astype(np.int32), committed=np.arange(R_MAX)[None, :] < rank[:, None])
    state = dict(state, trainable=dict(state["trainable"], alpha=np.asarray(grid, np.float32)), alloc=alloc)
    trainer.state = jax.device_put(state, trainer.state_shardings(state))


def _adam_state(opt_state) -> SlotAdamState:
    return next(s for s in opt_state if isinstance(s, SlotAdamState))


def test_one_trainer_step_matches_the_hand_derivation(tmp_path):
    """After one step: Adam's first moment of alpha = (1 - b1) (dL/dalpha + penalty gradient), the gradient by the
    chain rule sum_k dL/dcoef_k * s * r0 sigma'(z_k) / tau from dL/dcoef of the plain LoRA forward; the logged
    penalty lam (l1 + beta TV); alpha's first AdamW step at alpha_lr; the rank record of the new alpha; only the
    hard-mask rows of the factors moved."""
    r0, lam, beta, tau, lr, alpha_lr = 2, 0.05, 0.5, 0.5, 1e-2, 0.2
    model = make_toy_model(hidden=16)
    teacher = planted_teacher(model, [3, 1, 0, 2])
    trainer = _trainer(model, tmp_path, **{"adapter.initial_rank": r0, "adapter.ardlora.lam": lam,
                                           "adapter.ardlora.beta": beta, "adapter.ardlora.tau": tau,
                                           "adapter.ardlora.alpha_lr": alpha_lr, "optim.grad_clip": 0.0,
                                           "train.num_steps": 10})
    # r0 alpha = 0.6, 2.4 / 1.8, 1.1 -> ranks 1, 2 / 2, 1 (layers x [fc_in, fc_out])
    grid = np.array([[0.3, 1.2], [0.9, 0.55]], np.float32)
    _set_alpha(trainer, grid, r0)
    before = jax.device_get(trainer.state)
    batch = next(ToyBatches(model, teacher, 16))

    # dL/dcoef of the evaluated-model forward at the hard-mask coefficients, differentiated in coef directly
    rank = _hand_rank(_module_alpha(grid), r0)
    coefs = [SCALE * (np.arange(R_MAX) < rank[m]).astype(np.float32) for m in range(4)]
    slots, head = before["trainable"]["slots"], before["trainable"]["head"]

    def loss_of_coefs(coefs):
        lora = to_lora_collection(model.targets, slots["a"], slots["b"], coefs)
        out = model.module.apply({"params": merge_head(model.params, head), "lora": lora}, batch["input_ids"],
                                 batch["attention_mask"])
        numerator, weights = loss_terms("regression", out, batch)
        return numerator / weights

    dcoef = [np.asarray(g, np.float64) for g in jax.grad(loss_of_coefs)(coefs)]
    k = np.arange(1, R_MAX + 1)
    task_grad = np.zeros((2, 2))
    for m, a in enumerate(_module_alpha(grid).astype(np.float64)):
        s = _sigmoid((r0 * a - k + 0.5) / tau)
        task_grad[m // 2, m % 2] = np.sum(dcoef[m] * SCALE * r0 * s * (1 - s) / tau)
    # lam (sum |alpha| + beta sum_t |alpha[1, t] - alpha[0, t]|): d/dalpha = lam (sign + beta dTV)
    diff_sign = np.sign(grid[1] - grid[0]).astype(np.float64)
    penalty_grad = lam * (np.sign(grid) + beta * np.stack([-diff_sign, diff_sign]))
    expected_grad = task_grad + penalty_grad
    expected_penalty = lam * (np.abs(grid).sum() + beta * np.abs(grid[1] - grid[0]).sum())

    metrics = jax.device_get(trainer.train_step(batch))
    after = jax.device_get(trainer.state)
    assert float(metrics["orth_penalty"]) == pytest.approx(expected_penalty, rel=1e-6)
    mu = np.asarray(_adam_state(after["opt_state"]).mu["alpha"], np.float64)
    np.testing.assert_allclose(mu / (1 - 0.9), expected_grad, rtol=2e-4, atol=1e-7)
    assert np.all(np.abs(task_grad) > 1e-4), "every module's alpha should feel the task through the soft mask"

    # AdamW's first step (no weight decay on alpha): g / (|g| + eps) at alpha_lr
    g = expected_grad
    new_alpha = grid - alpha_lr * g / (np.abs(g) + 1e-6)  # optim.eps
    np.testing.assert_allclose(after["trainable"]["alpha"], new_alpha, rtol=0, atol=3e-6)  # float32 steps
    new_rank = _hand_rank(_module_alpha(new_alpha), r0)
    np.testing.assert_array_equal(after["alloc"]["rank"], new_rank)
    np.testing.assert_array_equal(after["alloc"]["committed"], np.arange(R_MAX)[None, :] < new_rank[:, None])
    assert not np.array_equal(new_rank, rank), "alpha_lr 0.2 moves r0 alpha by 0.4: some rank should change"
    assert int(metrics["total_rank"]) == new_rank.sum()

    for m in range(4):  # rows outside the pre-step mask get no gradient and are frozen (live mask)
        for part in ("a", "b"):
            old, new = before["trainable"]["slots"][part][m], after["trainable"]["slots"][part][m]
            np.testing.assert_array_equal(new[rank[m]:], old[rank[m]:])
            assert np.all(np.any(new[:rank[m]] != old[:rank[m]], axis=1)), (m, part)


def test_forward_coefs_are_hard_forward_soft_backward(tmp_path):
    """The method's train coefficients equal scale x hard mask, and their alpha gradient is the soft mask's,
    summed into each module's grid cell (two modules never share a cell)."""
    r0, tau = 2, 0.5
    model = make_toy_model(hidden=16)
    trainer = _trainer(model, tmp_path, **{"adapter.initial_rank": r0, "adapter.ardlora.tau": tau})
    method = trainer.method_impl
    grid = jnp.asarray([[0.3, 1.2], [0.9, 0.55]], jnp.float32)
    trainable = {**jax.device_get(trainer.state["trainable"]), "alpha": grid}
    coefs = np.asarray(method.forward_coefs(trainable, trainer.state["alloc"], {}, train=True))
    rank = _hand_rank(_module_alpha(grid), r0)
    np.testing.assert_array_equal(coefs, SCALE * (np.arange(R_MAX)[None, :] < rank[:, None]))
    np.testing.assert_array_equal(np.asarray(method.forward_coefs(trainable, trainer.state["alloc"], {}, train=False)),
                                  coefs)
    w = np.arange(16, dtype=np.float32).reshape(4, R_MAX) / 10
    grad = jax.grad(lambda al: jnp.sum(method.forward_coefs({**trainable, "alpha": al}, None, {}, True) * w))(grid)
    k = np.arange(1, R_MAX + 1)
    expected = np.zeros((2, 2))
    for m, a in enumerate(_module_alpha(grid).astype(np.float64)):
        s = _sigmoid((r0 * a - k + 0.5) / tau)
        expected[m // 2, m % 2] = np.sum(w[m] * SCALE * r0 * s * (1 - s) / tau)
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-5)
    assert method.num_live_rows(trainer.state["alloc"], {}) == R_MAX, "rows past the mask feed alpha's gradient"


@pytest.mark.parametrize("lam, r0, direction", [(0.0, 1, "up"), (1.0, 3, "down")])
def test_trainer_learns_and_ranks_follow_alpha(tmp_path, lam, r0, direction):
    """On a planted rank-4 task: without the regulariser alpha grows and ranks rise past r0, a strong l1 drives
    every rank down to the floor of 1; the loss falls either way and the rank record is alpha's, by hand."""
    model = make_toy_model(hidden=16)
    teacher = planted_teacher(model, [4, 4, 4, 4])
    steps = 40
    trainer = _trainer(model, tmp_path, **{"adapter.initial_rank": r0, "adapter.ardlora.lam": lam,
                                           "adapter.ardlora.alpha_lr": 5e-2, "train.num_steps": steps})
    held_out = toy_batch(model, teacher, 10_000, 64)

    def held_out_mse():
        return float(np.mean((trainer.predict(held_out)["logits"] - held_out["labels"]) ** 2))

    start = held_out_mse()
    data = ToyBatches(model, teacher, 16)
    totals = [int(jax.device_get(trainer.train_step(next(data)))["total_rank"]) for _ in range(steps)]
    assert held_out_mse() < 0.7 * start
    alpha = np.asarray(jax.device_get(trainer.state["trainable"]["alpha"]))
    rank = _hand_rank(_module_alpha(alpha), r0)
    assert trainer.ranks() == {t.hf_path: int(r) for t, r in zip(model.targets, rank)}
    np.testing.assert_array_equal(np.asarray(trainer.state["alloc"]["committed"]),
                                  np.arange(R_MAX)[None, :] < rank[:, None])
    if direction == "up":
        assert totals[-1] > 4 * r0 and np.all(rank >= r0)
    else:
        assert totals[-1] == 4 and np.all(alpha < 0.5 / r0)
    trainer.close()


def _assert_same_state(a, b):
    flat_a = jax.tree_util.tree_flatten_with_path(jax.device_get(a))[0]
    flat_b = jax.tree_util.tree_flatten_with_path(jax.device_get(b))[0]
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def test_resume_is_bit_exact(tmp_path):
    """2N straight steps == N steps, checkpoint, restore in a new Trainer, N more (alpha, Adam moments, ranks)."""
    n = 4
    overrides = {"adapter.initial_rank": 2, "adapter.ardlora.lam": 0.0, "adapter.ardlora.alpha_lr": 0.1,
                 "checkpoint.every_steps": n, "checkpoint.keep": 3, "adapter.dropout": 0.1}
    model = make_toy_model(hidden=16, adapter_dropout=0.1)
    teacher = planted_teacher(model, [4, 4, 4, 4])
    out = tmp_path / "run"
    straight = _trainer(model, out, **overrides)
    data = ToyBatches(model, teacher, 8)
    straight.train(data, 2 * n, data.state, progress=False)
    final = jax.device_get(straight.state)
    assert int(final["alloc"]["rank"].sum()) != 4 * 2, "the run should move some rank"
    straight.close()
    shutil.rmtree(out / "checkpoints" / str(2 * n))

    resumed = Trainer(model, _config(**overrides), make_mesh(1, 1), out)
    data_state = resumed.restore_or_init({"position": -1})
    assert data_state == {"position": n} and resumed.step == n
    data = ToyBatches(model, teacher, 8, start=data_state["position"])
    resumed.train(data, 2 * n, data.state, progress=False)
    _assert_same_state(final, resumed.state)
    resumed.close()


@pytest.mark.parametrize("overrides, message", [
    ({"adapter.ardlora.tau": 0.0}, "adapter.ardlora.tau=0.0 must be > 0 (the soft slot mask's temperature)"),
    ({"adapter.initial_rank": 5}, "adapter.initial_rank=5 is larger than adapter.r_max=4"),
])
def test_bad_settings_are_refused_in_one_line_before_compute(tmp_path, overrides, message):
    model = make_toy_model(hidden=16)
    with pytest.raises(ConfigError) as err:
        Trainer(model, _config(**overrides), make_mesh(1, 1), tmp_path)
    assert str(err.value) == message
    assert not (tmp_path / "checkpoints").exists()



@pytest.mark.slow
@pytest.mark.parametrize("family, task", [("deberta", "classification"), ("qwen3", "qa")])
def test_trained_ardlora_exports_to_peft(tmp_path, family, task):
    """PEFT's LoRA with the exported rank_pattern / alpha_pattern reproduces trainer.predict (<= 1e-4) after ARD
    training moved the ranks; every module keeps rank >= 1 and the exported ranks are the effective ranks."""

    from adapad_jax.models.registry import load_model
    from adapad_jax.testing.tiny import build_tiny_deberta, build_tiny_qwen3

    build = build_tiny_deberta if family == "deberta" else build_tiny_qwen3
    num_labels = 3 if task == "classification" else 2
    path = build(tmp_path / "ckpt", task=task, num_labels=num_labels)
    model = load_model(str(path), task=task, num_labels=num_labels)
    r0 = 2
    trainer = Trainer(model, _config(**{"adapter.initial_rank": r0, "adapter.init_std": 0.05,
                                        "optim.learning_rate": 5e-2, "adapter.ardlora.alpha_lr": 0.05,
                                        "model.name_or_path": str(path)}), make_mesh(1, 1), tmp_path / "out")
    trainer.restore_or_init({})
    # Spread the ranks (r0 alpha = 0.6 ... 3.6 -> ranks 1..4) so the export carries several ranks.
    alpha = np.asarray(jax.device_get(trainer.state["trainable"]["alpha"]))
    spread = np.linspace(0.3, 1.8, alpha.size, dtype=np.float32).reshape(alpha.shape)
    state = jax.device_get(trainer.state)
    state = dict(state, trainable=dict(state["trainable"], alpha=spread))
    trainer.state = jax.device_put(state, trainer.state_shardings(state))
    rng = np.random.default_rng(0)
    trainer.train(iter([hf_batch(rng, task) for _ in range(3)]), 3, lambda: {}, progress=False)
    ranks = trainer.ranks()
    module_alpha = np.asarray(trainer.method_impl.module_alpha(trainer.state["trainable"]["alpha"]))
    assert list(ranks.values()) == _hand_rank(module_alpha, r0).tolist()
    assert len(set(ranks.values())) >= 3 and min(ranks.values()) >= 1
    out = export_trainer(trainer, tmp_path / "export")

    peft_model = assert_peft_reproduces_predict(trainer, path, out / "adapter", hf_batch(rng, task, size=5), task)
    wrapped = {name.removeprefix("base_model.model."): module.lora_A["default"].weight.shape[0]
               for name, module in peft_model.named_modules() if hasattr(module, "lora_A")
               and "default" in getattr(module, "lora_A", {})}
    assert wrapped == ranks
    trainer.close()


@pytest.mark.slow
def test_end_to_end_run_writes_every_output_and_peft_reproduces_it(tmp_path):
    """run.core.run with adapter.method=ardlora on a tiny Qwen3 (GLUE MRPC rows): every output file, ranks.json =
    the effective ranks, eval_results' rank record consistent (reachable = capacity: ARD has no budget of its
    own), metrics recomputed from predictions, and PEFT reproducing every validation row (test_e2e_runs' checks)."""
    from test_e2e_runs import check_metrics_agree_with_predictions, check_outputs, check_peft_reproduces_jax
    from test_e2e_runs import tiny_run_config

    from adapad_jax.run import core as run_lib

    config = tiny_run_config(tmp_path, "glue_mrpc", "qwen3", adapter__method="ardlora", adapter__initial_rank=2)
    # A strong l1 sets alpha's direction (down); alpha_lr 0.4 over the 4-step schedule moves r0 alpha from 2 to ~0.4
    config.adapter.ardlora.alpha_lr = 0.4
    config.adapter.ardlora.lam = 10.0
    result = run_lib.run(config, progress=False, keep_trainer=True, log=lambda _: None)
    try:
        assert result.step == config.train.num_steps
        check_outputs(result.output_dir, result.ranks)
        check_metrics_agree_with_predictions(config, result.output_dir)
        check_peft_reproduces_jax(config, result)
        assert sum(result.ranks.values()) < 2 * len(result.ranks), "alpha should have moved some rank off r0 = 2"
        alpha = result.trainer.method_impl.module_alpha(result.trainer.state["trainable"]["alpha"])
        assert list(result.ranks.values()) == _hand_rank(np.asarray(alpha), 2, r_max=2).tolist()
        results = json.loads((result.output_dir / "eval_results.json").read_text())
        assert results["rank"]["reachable_total_rank"] == results["rank"]["rank_budget"] == len(result.ranks) * 2
    finally:
        result.trainer.close()
