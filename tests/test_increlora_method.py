"""adapter.method=increlora in the Trainer, checked against the NumPy oracle of tests/test_increlora_rules.py.

The oracle restates the reference (``FeiyuZhang98/IncreLoRA``): ``loralib/loralib/increlora.py`` (L),
``NLU/src/transformers/trainer.py`` (T), ``NLU/src/transformers/optimization.py`` (O). Here it is fed scores that
this file computes itself (a separate jax.grad of the plain MSE w.r.t. each frozen kernel, ΔW in NumPy), never
the trainer's, and the trainer's state is compared with it after every step.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from helpers_hf import assert_peft_reproduces_predict, hf_batch
from adapad_jax.run.core import export_trainer
from adapad_jax.config.schema import ConfigError
from adapad_jax.methods import increlora as inc
from adapad_jax.methods.registry import build_method
from adapad_jax.testing.toy import ToyBatches, enable_compilation_cache, make_toy_model, planted_teacher, toy_config
from adapad_jax.training import Trainer, make_mesh
from adapad_jax.training.hooks import StepInfo
from adapad_jax.training.settings import TrainerSettings
from test_increlora_rules import _OracleAllocator, _oracle_multiplier, _oracle_score, _oracle_w

enable_compilation_cache()

STEPS = 14
ALPHA = 8.0
OVERRIDES = {"adapter.method": "increlora", "adapter.rank_budget": 8, "adapter.top_k": 1,
             "adapter.growth_interval": 2, "adapter.init_std": 0.1, "adapter.alpha": ALPHA,
             "optim.learning_rate": 1e-2, "optim.warmup_steps": 2, "train.num_steps": STEPS,
             "checkpoint.every_steps": 0}
WARMUP, INTERVAL, TOP_H, TARGET = 2, 2, 1, 8  # init_warmup 0 = growth_interval


def _config(**extra):
    return toy_config(**{**OVERRIDES, **extra})


def _head_params(model, head):
    flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, model.params))
    for key, subtree in head.items():
        prefix = tuple(key.split("/"))
        for path, value in traverse_util.flatten_dict(subtree).items():
            flat[prefix + path] = np.asarray(value)
    return flat


def _independent_scores(model, state, batch):
    """L ``backward_hook`` per module from scratch: ΔW from the raw e, a, b (``loraW``), dL/dΔW by jax.grad of the
    mean squared error w.r.t. each frozen kernel of a plain ``module.apply``."""
    host = jax.device_get(state)
    slots, ranknum, allocated = host["trainable"]["slots"], host["alloc"]["rank"], host["method"]["allocated"]
    flat = _head_params(model, host["trainable"]["head"])
    lora, deltas = {}, []
    for m, target in enumerate(model.targets):
        n = int(allocated[m])
        a, b, e = slots["a"][m][:n], slots["b"][m][:n], slots["e"][m][:n, 0]
        lora[target.flax_path + ("a",)] = a
        lora[target.flax_path + ("b",)] = b
        lora[target.flax_path + ("coef",)] = (e * ALPHA / (ranknum[m] + 1e-5)).astype(np.float32)
        deltas.append(_oracle_w(list(a.astype(np.float64)), e.astype(np.float64), list(b.astype(np.float64)),
                                ALPHA, float(ranknum[m])))
    lora = traverse_util.unflatten_dict(lora)
    paths = [t.flax_path + ("kernel",) for t in model.targets]

    def loss(kernels):
        params = dict(flat)
        params.update(dict(zip(paths, kernels)))
        out = model.module.apply({"params": traverse_util.unflatten_dict(params), "lora": lora},
                                 batch["input_ids"], batch["attention_mask"])["logits"]
        return jnp.mean(jnp.square(out - batch["labels"]))

    grads = jax.grad(loss)([jnp.asarray(flat[p]) for p in paths])
    return [_oracle_score(d, np.asarray(g, np.float64).T) for d, g in zip(deltas, grads)]


@pytest.fixture(scope="module")
def stepped(tmp_path_factory):
    """The Trainer's own loop, one step at a time (train_step, then the host-update hook as ``train`` calls it),
    with the oracle fed independent scores of every step's pre-step state."""
    model = make_toy_model(hidden=16)
    teacher = planted_teacher(model, [2, 1, 0, 0])
    trainer = Trainer(model, _config(), make_mesh(1, 1), tmp_path_factory.mktemp("increlora"))
    trainer.restore_or_init({"position": 0})
    oracle = _OracleAllocator(len(model.targets), 1, TARGET, WARMUP, INTERVAL, TOP_H)
    data = ToyBatches(model, teacher, 8)
    probe = ToyBatches(model, teacher, 32, seed=7).__next__()
    records = []
    first_loss = float(np.mean((trainer.predict(probe)["logits"] - probe["labels"]) ** 2))
    for g in range(STEPS):
        batch = next(data)
        scores = _independent_scores(model, trainer.state, batch) if oracle.total < oracle.target else None
        before = jax.device_get(trainer.state)
        metrics = trainer.train_step(batch)
        stepped_state = jax.device_get(trainer.state)
        info = StepInfo(g + 1, STEPS, metrics, trainer.live_slots)
        if trainer.method_impl.host_update_due(g + 1):
            trainer._host_update(info)
        grown = oracle.step(g, scores)
        records.append({"g": g, "scores": scores, "before": before, "stepped": stepped_state,
                        "after": jax.device_get(trainer.state),
                        "lr": float(metrics["lr"]), "grown": grown,
                        "oracle": {"ranknum": list(oracle.ranknum), "e": [list(x) for x in oracle.e],
                                   "e_group": [list(x) for x in oracle.e_group],
                                   "ab_group": [list(x) for x in oracle.ab_group],
                                   "avg_ipt": list(oracle.avg_ipt), "avg_unc": list(oracle.avg_unc),
                                   "ipt": list(oracle.ipt), "total": oracle.total}})
    last_loss = float(np.mean((trainer.predict(probe)["logits"] - probe["labels"]) ** 2))
    yield {"trainer": trainer, "records": records, "losses": (first_loss, last_loss)}
    trainer.close()


def test_trainer_trains_and_grows_to_the_budget(stepped):
    first, last = stepped["losses"]
    assert last < 0.8 * first, f"the planted task's held-out loss should fall: {first} -> {last}"
    trainer = stepped["trainer"]
    ranks = trainer.ranks()
    assert sum(ranks.values()) == TARGET and min(ranks.values()) >= 1
    grown_at = [r["g"] for r in stepped["records"] if r["grown"]]
    assert grown_at == [4, 6, 8, 10], "L: growth at g > init_warmup, g % incre_interval == 0, until the budget"
    state = trainer.state
    assert not bool(state["method"]["scoring"]) and int(state["alloc"]["budget_left"]) == 0
    assert int(state["alloc"]["budget_spent_step"]) == 11
    schedule = trainer.rank_schedule()
    assert schedule["reachable_total_rank"] == schedule["total_rank"] == TARGET
    assert trainer.rank_schedule(8)["reachable_total_rank"] == 6, "growth after g = 4, 6 (completed steps 5, 7)"


def test_in_trainer_scores_emas_growth_and_lambda_follow_the_oracle(stepped):
    """L ``backward_hook`` / ``update_ipt`` / ``increase_to_target_rank`` / ``add_reserve_param``, every step."""
    for record in stepped["records"]:
        g, after, want = record["g"], record["after"], record["oracle"]
        alloc, ms = after["alloc"], after["method"]
        if record["scores"] is not None:
            np.testing.assert_allclose(ms["ipt"], record["scores"], rtol=2e-4, atol=1e-9,
                                       err_msg=f"L SVDLinear.backward_hook score, step {g}")
        np.testing.assert_allclose(alloc["imp_ema"], want["avg_ipt"], rtol=2e-4, atol=1e-10,
                                   err_msg=f"L update_ipt exp_avg_ipt, step {g}")
        np.testing.assert_allclose(alloc["unc_ema"], want["avg_unc"], rtol=2e-3, atol=1e-10,
                                   err_msg=f"L update_ipt exp_avg_unc, step {g}")
        assert alloc["rank"].tolist() == want["ranknum"], f"L ranknum (increase_to_target_rank), step {g}"
        assert bool(ms["scoring"]) == (want["total"] < TARGET), f"L update_and_increase guard, step {g}"
        for m, e_rows in enumerate(want["e"]):
            n = len(e_rows)
            assert int(ms["allocated"][m]) == n, f"L lora_E ParameterList length, module {m}, step {g}"
            groups = [inc.FROZEN if x is None else x for x in want["e_group"][m]]
            assert ms["e_group"][m, :n].tolist() == groups, f"L E param groups, module {m}, step {g}"
            assert ms["ab_group"][m, :n].tolist() == want["ab_group"][m], f"L A/B param groups, module {m}, step {g}"
            e = after["trainable"]["slots"]["e"][m][:, 0]
            for j, group in enumerate(groups):
                if group == inc.FROZEN or group == g:  # frozen, or promoted now: still the value the rule set
                    assert e[j] == np.float32(e_rows[j]), \
                        f"L add_reserve_param E = 1e-5 frozen / E = 0 at the budget, module {m} row {j} step {g}"
            assert not e[n:].any()
    last = stepped["records"][-1]
    assert last["oracle"]["total"] == TARGET
    for m, e_rows in enumerate(last["oracle"]["e"]):
        assert e_rows[-1] == 0.0 and last["after"]["trainable"]["slots"]["e"][m][len(e_rows) - 1, 0] == 0.0, \
            "L increase_to_target_rank: at the budget every module's reserve E is filled with 0"


def test_restarted_learning_rate_in_the_trainer(stepped):
    """O ``Multi_LambdaLR``: a group created at g has lr 0 at g + 1 (warm-up count 0), so its rows do not move
    while the shared lr is positive; at g + 2 they do. Frozen E never moves."""
    checked = 0
    for record in stepped["records"][1:]:
        g, before, after = record["g"], record["before"], record["stepped"]  # the optimiser step, before growth
        assert record["lr"] > 0
        ms = before["method"]
        for m in range(len(ms["allocated"])):
            for part, groups in (("a", ms["ab_group"]), ("e", ms["e_group"])):
                old = before["trainable"]["slots"][part][m]
                new = after["trainable"]["slots"][part][m]
                for j, group in enumerate(groups[m]):
                    moved = not np.array_equal(old[j], new[j])
                    if group == g - 1 or group == inc.FROZEN:
                        assert not moved, f"O: group {group} row {j} of module {m} moved at step {g}"
                        checked += group == g - 1
                    elif group == g - 2:
                        assert moved, f"O: group {group} row {j} of module {m} did not move at step {g}"
    assert checked >= 8


def test_lr_multipliers_are_the_rules_and_the_oracle_over_the_shared_lr(stepped):
    """O ``Multi_LambdaLR`` per row: the jitted multipliers equal ``slot_lr_multipliers`` (and the oracle's closed
    form) divided by the shared schedule's value, 1 for the optimiser's own groups."""
    trainer = stepped["trainer"]
    method = trainer.method_impl
    ms = jax.device_get(trainer.state["method"])
    rules = method.rules_state(jax.device_get(trainer.state["alloc"]), ms)
    peak = OVERRIDES["optim.learning_rate"]
    for step in range(STEPS):
        lr = float(trainer.schedule(step))
        e_mult, ab_mult = map(np.asarray, method.lr_multipliers(jnp.asarray(step), jnp.asarray(lr, jnp.float32), ms))
        want_e, want_ab = inc.slot_lr_multipliers(rules, step, WARMUP, STEPS)
        for got, want, groups in ((e_mult, want_e, rules.e_group), (ab_mult, want_ab, rules.ab_group)):
            initial = groups == inc.INITIAL_GROUP
            assert np.all(got[initial] == 1.0)
            ratio = peak / lr if lr > 0 else 0.0
            made = ~initial & (groups <= step)  # frozen rows and groups that exist at this step
            np.testing.assert_allclose(got[made], want[made] * ratio, rtol=1e-5, atol=1e-7)
            for (m, j) in zip(*np.nonzero(made & (groups != inc.FROZEN) & (groups != step))):
                assert got[m, j] * lr / peak == pytest.approx(_oracle_multiplier(step, int(groups[m, j]), WARMUP,
                                                                                 STEPS), rel=1e-5, abs=1e-7)
    assert inc.group_lr_multiplier(0, inc.INITIAL_GROUP, WARMUP, STEPS) == 0.0


def test_resume_is_bit_exact(tmp_path):
    model = make_toy_model(hidden=16)
    teacher = planted_teacher(model, [2, 1, 0, 0])
    config = _config(**{"checkpoint.every_steps": 5, "train.num_steps": 10})

    straight = Trainer(model, config, make_mesh(1, 1), tmp_path / "straight")
    straight.restore_or_init({"position": 0})
    data = ToyBatches(model, teacher, 8)
    straight.train(data, 10, data.state, progress=False)
    import shutil

    shutil.rmtree(tmp_path / "straight" / "checkpoints" / "10")
    resumed = Trainer(model, config, make_mesh(1, 1), tmp_path / "straight")
    position = resumed.restore_or_init({"position": 0})
    assert resumed.step == 5 and position == {"position": 5}
    data = ToyBatches(model, teacher, 8, start=5)
    resumed.train(data, 10, data.state, progress=False)
    assert sum(resumed.ranks().values()) > 4, "growth happened after the restore"
    flat_a = jax.tree_util.tree_flatten_with_path(jax.device_get(straight.state))[0]
    flat_b = jax.tree_util.tree_flatten_with_path(jax.device_get(resumed.state))[0]
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
    straight.close()
    resumed.close()


def _settings(**extra):
    return TrainerSettings.from_config(_config(**extra))


@pytest.mark.parametrize("extra, message", [
    ({"adapter.rank_budget": 3}, "adapter.rank_budget=3 is below the 4 adapted modules"),
    ({"adapter.rank_budget": 10}, "adapter.increlora.incre_rank_num=0 takes the reference's table"),
    ({"optim.schedule": "cosine"}, "adapter.increlora.multi_lr restarts the linear warm-up/decay"),
    ({"adapter.top_k": 0}, "adapter.method=increlora needs adapter.growth_interval >= 1"),
])
def test_bad_settings_are_refused_in_one_line(extra, message):
    model = make_toy_model(hidden=16)
    with pytest.raises(ConfigError) as err:
        build_method(_settings(**extra), model.targets)
    assert message in str(err.value) and "\n" not in str(err.value)
    build_method(_settings(**{**extra, "adapter.rank_budget": 12, "adapter.increlora.incre_rank_num": 1,
                              "optim.schedule": "linear", "adapter.top_k": 1}), model.targets)


def test_glue_preset_fills_the_method_block_and_builds():
    """S ``run_rte.sh`` / ``run_cola.sh``: reg_orth_coef 0.3 / 0.1, one rank per promotion (target_rank 2)."""
    from adapad_jax.config.increlora_presets import GLUE_SETTINGS
    from adapad_jax.config.presets import glue_config
    from adapad_jax.adapters.target import AdapterTarget

    assert inc.GLUE_SETTINGS is GLUE_SETTINGS
    kwargs = dict(epochs=1, batch_size=32, alpha=32, warmup=100, top_k=3, growth_interval=100, orth_reg=0.0,
                  adapter_dropout=0.0, classifier_dropout=0.0, adapter_weight_decay=0.0, schedule="linear")
    for task, orth in (("rte", 0.3), ("cola", 0.1)):
        config = glue_config(task, **kwargs)
        assert config.adapter.increlora.reg_orth_coef == orth and config.adapter.increlora.incre_rank_num == 1
    config.adapter.method = "increlora"
    targets = [AdapterTarget(f"m{i}", (f"m{i}",), 768, 768) for i in range(72)]
    method = build_method(TrainerSettings.from_config(config), targets)
    # the cap r_max 4 plus one promotion's reserve (uncapped the reference would need slots_needed = 75)
    assert method.num_slots == min(inc.slots_needed(1, 144, 72, 1), 4 + 1) == 5
    assert method.schedule.init_warmup == 100 and method.schedule.top_h == 3


def test_parameter_counts_add_one_lambda_per_rank():
    model = make_toy_model(hidden=16)
    method = build_method(_settings(), model.targets)
    ranks = {t.hf_path: r for t, r in zip(model.targets, (1, 2, 3, 2))}
    counts = method.parameter_counts(ranks)
    factors = sum(r * (t.in_features + t.out_features) for t, r in zip(model.targets, (1, 2, 3, 2)))
    assert counts == {"factors": factors, "with_extras": factors + 8, "with_reserves": factors + 8, "head": 0}
    assert math.isclose(method.scaling, ALPHA)



@pytest.mark.slow
@pytest.mark.parametrize("family, task, budget_extra", [("deberta", "classification", 2), ("qwen3", "qa", 8)])
def test_peft_export_reproduces_predict(tmp_path, family, task, budget_extra):
    """PEFT LoRA export (e * alpha / (ranknum + 1e-5) folded into B, rank_pattern / alpha_pattern) loaded by
    ``peft.PeftModel.from_pretrained`` gives trainer.predict's logits; DeBERTa ends at the budget (reserves'
    E = 0), Qwen3 before it (reserves at E = 1e-5 train but are neither evaluated nor exported)."""
    import json

    from adapad_jax.models.registry import load_model
    from adapad_jax.testing.tiny import build_tiny_deberta, build_tiny_qwen3

    build = build_tiny_deberta if family == "deberta" else build_tiny_qwen3
    num_labels = 3 if task == "classification" else 2
    path = build(tmp_path / "ckpt", task=task, num_labels=num_labels)
    model = load_model(str(path), task=task, num_labels=num_labels)
    modules = len(model.targets)
    cfg = toy_config(**{"adapter.method": "increlora", "adapter.rank_budget": modules + budget_extra,
                        "adapter.increlora.incre_rank_num": 1, "adapter.top_k": 2, "adapter.growth_interval": 2,
                        "adapter.init_std": 0.05, "adapter.alpha": 16.0, "optim.learning_rate": 5e-2,
                        "optim.warmup_steps": 1, "model.name_or_path": str(path), "checkpoint.every_steps": 0})
    trainer = Trainer(model, cfg, make_mesh(1, 1), tmp_path / "out")
    trainer.restore_or_init({})
    rng = np.random.default_rng(0)
    trainer.train(iter([hf_batch(rng, task) for _ in range(7)]), 7, lambda: {}, progress=False)
    total = sum(trainer.ranks().values())
    assert total == modules + min(budget_extra, 4), "growth steps g = 4, 6 of top_h = 2, up to the budget"
    assert (total == trainer.rank_budget) == (family == "deberta")
    reserve_e = [float(np.asarray(e)[int(n) - 1, 0]) for e, n in zip(trainer.state["trainable"]["slots"]["e"],
                                                                     trainer.state["method"]["allocated"])]
    assert all(x == (0.0 if family == "deberta" else np.float32(1e-5)) for x in reserve_e)
    out = export_trainer(trainer, tmp_path / "export")
    ranks = json.loads((out / "adapter" / "adapter_config.json").read_text())["rank_pattern"]
    assert sorted(ranks.values()) == sorted(r for r in trainer.ranks().values() if r > 0)

    assert_peft_reproduces_predict(trainer, path, out / "adapter", hf_batch(rng, task, size=5), task)
    trainer.close()


@pytest.mark.slow
def test_glue_run_end_to_end(tmp_path):
    """The whole run (data, train with growth, eval, checkpoints, outputs, PEFT export) with
    adapter.method=increlora on a tiny DeBERTaV3 CoLA: the run's checks of tests/test_e2e_runs.py."""
    from adapad_jax.run import core as run_lib
    from test_e2e_runs import check_metrics_agree_with_predictions, check_outputs, check_peft_reproduces_jax
    from test_e2e_runs import tiny_run_config

    config = tiny_run_config(tmp_path, "glue_cola", "deberta", adapter__method="increlora")
    config.adapter.increlora.incre_rank_num = 1
    config.train.num_steps = 6
    result = run_lib.run(config, progress=False, keep_trainer=True, log=lambda _: None)
    try:
        assert result.step == 6
        assert sum(result.ranks.values()) == len(result.ranks) + config.adapter.top_k, "growth at g = 4"
        check_outputs(result.output_dir, result.ranks)
        check_metrics_agree_with_predictions(config, result.output_dir)
        check_peft_reproduces_jax(config, result)
    finally:
        result.trainer.close()


def test_without_advance_learning_reserves_stay_at_their_init(tmp_path):
    """L ``add_reserve_param(add_r, False)``: a reserve's E = 0 and its a, b frozen until promotion, when all three
    join the optimiser (``increase_to_target_rank``'s advance_learn=False branch)."""
    model = make_toy_model(hidden=16)
    teacher = planted_teacher(model, [2, 1, 0, 0])
    trainer = Trainer(model, _config(**{"adapter.increlora.advance_learn": False, "train.num_steps": 6}),
                      make_mesh(1, 1), tmp_path)
    trainer.restore_or_init({"position": 0})
    init = jax.device_get(trainer.state["trainable"]["slots"])
    data = ToyBatches(model, teacher, 8)
    trainer.train(data, 6, data.state, progress=False)
    state = jax.device_get(trainer.state)
    ms, slots = state["method"], state["trainable"]["slots"]
    assert sum(trainer.ranks().values()) == 5, "one growth at g = 4"
    for m in range(4):
        n, r = int(ms["allocated"][m]), int(state["alloc"]["rank"][m])
        assert n == r + 1 and ms["e_group"][m, r] == inc.FROZEN and ms["ab_group"][m, r] == inc.FROZEN
        assert slots["e"][m][r, 0] == 0.0, "L: a reserve's E is 0 without advance learning"
        np.testing.assert_array_equal(slots["a"][m][r], init["a"][m][r], err_msg="L: a frozen reserve's A")
        if r == 2:
            assert ms["e_group"][m, 1] == ms["ab_group"][m, 1] == 4, "L: promoted E, A and B join the step-4 group"


def test_a_data_and_components_mesh_trains_the_same_run(tmp_path):
    """The same 7 steps (two growth steps) on one device and on a (data=2, components=2) mesh: the per-device dL/dW
    are summed over ``data`` before the score, so scores, growth and parameters agree to float tolerance."""
    model = make_toy_model(hidden=16)
    teacher = planted_teacher(model, [2, 1, 0, 0])
    states = []
    for mesh in ((1, 1), (2, 2)):
        trainer = Trainer(model, _config(**{"train.num_steps": 7}), make_mesh(*mesh), tmp_path / f"{mesh}")
        trainer.restore_or_init({"position": 0})
        data = ToyBatches(model, teacher, 8)
        trainer.train(data, 7, data.state, progress=False)
        states.append(jax.device_get(trainer.state))
        trainer.close()
    assert states[0]["alloc"]["rank"].sum() == 6, "growth at g = 4 and 6"
    flat_a = jax.tree_util.tree_flatten_with_path(states[0])[0]
    flat_b = jax.tree_util.tree_flatten_with_path(states[1])[0]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        np.testing.assert_allclose(np.asarray(y, np.float64), np.asarray(x, np.float64), rtol=1e-4, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))
