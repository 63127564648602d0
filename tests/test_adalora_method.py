"""``adapter.method=adalora`` in the Trainer, checked against PEFT's own AdaLoRA (``peft.tuners.adalora``).

- the Trainer trains it: the toy loss falls and the total rank follows the cubic schedule down to the budget;
- the in-trainer allocation (post-step parameters, gradients clipped by ``optim.grad_clip``, step numbering, the
  jitted budget tables) equals ``AdaLoraModel.update_and_allocate`` fed the same parameters and gradients, with
  the clip done by torch's ``clip_grad_norm_`` as the reference trainer does;
- the trainer's forward and orthogonal penalty equal PEFT's AdaLoRA model with the same weights (tiny DeBERTa);
- both exports (LoRA with E folded into B; native ``AdaLoraConfig``) load in ``peft.PeftModel.from_pretrained``
  and reproduce ``trainer.predict`` on a tiny DeBERTaV3 and a tiny Qwen3;
- resume is bit-exact; settings that cannot run are refused in one line before any step.
"""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
from reference_libs import import_reference

from helpers_hf import assert_peft_reproduces_predict, hf_batch
from adapad_jax.run.core import export_trainer
from adapad_jax.config.schema import ConfigError
from adapad_jax.methods import adalora
from adapad_jax.methods.registry import METHOD_CLASSES
from adapad_jax.testing.toy import ToyBatches, enable_compilation_cache, make_toy_model, planted_teacher, toy_config
from adapad_jax.training import Trainer, make_mesh
from adapad_jax.training.settings import TrainerSettings

torch = import_reference("torch")
peft = import_reference("peft")

enable_compilation_cache()

R, BUDGET, TINIT, TFINAL, DELTA_T, TOTAL = 4, 8, 3, 4, 2, 16
ADALORA = {"adapter.method": "adalora", "adapter.r_max": R, "adapter.rank_budget": BUDGET, "adapter.init_std": 0.1,
           "adapter.adalora.tinit": TINIT, "adapter.adalora.tfinal": TFINAL, "adapter.adalora.deltaT": DELTA_T,
           "adapter.adalora.orth_reg_weight": 0.1, "optim.learning_rate": 3e-2, "train.num_steps": TOTAL}


def _toy_trainer(tmp_path, name="out", **overrides):
    model = make_toy_model(hidden=16)
    trainer = Trainer(model, toy_config(**{**ADALORA, **overrides}), make_mesh(1, 1), tmp_path / name)
    trainer.restore_or_init({"position": 0})
    return trainer, ToyBatches(model, planted_teacher(model, [2, 1, 0, 0]), 16)


# ------------------------------------------------------------------------------------------------ training
def test_trainer_trains_and_ranks_follow_the_cubic_schedule(tmp_path):
    trainer, data = _toy_trainer(tmp_path)
    trainer.train(data, TOTAL, data.state, progress=False)
    records = [json.loads(line) for line in (trainer.output_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records]
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4]), losses
    ranks = [r["total_rank"] for r in records]
    schedule = trainer.method_impl.schedule()
    # every row kept until the first re-mask after tinit; the rank moves only at re-masks (every deltaT steps in
    # the decay, global step = trainer step - 1), to at most the cubic budget; the target at the final mask
    budgets, flags = adalora.budget_tables(schedule)
    allowed, previous = 4 * R, 4 * R
    for step, total_rank in enumerate(ranks, start=1):
        global_step = step - 1
        remask = (global_step < TOTAL - TFINAL and flags[global_step]) or global_step == TOTAL - TFINAL
        if remask:
            allowed = budgets[global_step]
        else:
            assert total_rank == previous, (step, ranks)
        assert total_rank <= allowed, (step, ranks)
        previous = total_rank
    assert ranks[:TINIT + 1] == [4 * R] * (TINIT + 1) and ranks[TINIT + 1] < 4 * R, ranks
    assert ranks[TOTAL - TFINAL:] == [BUDGET] * TFINAL, ranks
    assert schedule.target_budget == BUDGET and sum(trainer.ranks().values()) == BUDGET
    assert int(trainer.state["alloc"]["budget_spent_step"]) == TOTAL - TFINAL + 1
    e = np.concatenate([np.asarray(x)[:, 0] for x in trainer.state["trainable"]["slots"]["e"]])
    committed = np.asarray(trainer.state["alloc"]["committed"]).reshape(-1)
    assert np.all(e[~committed] == 0) and np.all(e[committed] != 0), "masked E zeroed, kept E trained"
    trainer.close()


# ------------------------------------------------------------------------ in-trainer rule == PEFT's rule
class _Recording(adalora.AdaLoRA):
    """AdaLoRA that also keeps, in its state, what ``after_update`` was given (post-step slots, raw gradients)."""

    def init_method_state(self, trainable):
        state = super().init_method_state(trainable)
        zeros = jax.tree.map(np.zeros_like, trainable)
        return {**state, "seen_slots": zeros["slots"], "seen_grads": zeros}

    def after_update(self, trainable, grads, alloc, method_state, scores, step, key):
        seen = {"seen_slots": trainable["slots"], "seen_grads": grads}
        trainable, alloc, method_state, changed = super().after_update(trainable, grads, alloc, method_state, scores,
                                                                        step, key)
        return trainable, alloc, {**method_state, **seen}, changed


class _Linears(torch.nn.Module):
    """A torch module with one Linear per toy adapter target, for PEFT's AdaLoRA to wrap."""

    def __init__(self, targets):
        super().__init__()
        for m, target in enumerate(targets):
            self.add_module(f"fc{m}", torch.nn.Linear(target.in_features, target.out_features))


def _to_torch(kind, value):
    value = np.array(value, np.float32)
    return torch.from_numpy(np.ascontiguousarray(value.T) if kind == "b" else value)


def test_in_trainer_allocation_equals_peft_update_and_allocate(tmp_path, monkeypatch):
    """Each step, PEFT gets the trainer's post-step A/E/B and raw gradients (head included), clips them with
    ``torch.nn.utils.clip_grad_norm_`` and runs ``update_and_allocate(global_step)``; the trainer's E, rank pattern
    and EMAs must equal PEFT's after every one of the 16 steps (which cover the initial, decay and final phases)."""
    monkeypatch.setitem(METHOD_CLASSES, "adalora", _Recording)
    clip = 0.05  # small enough that every step is clipped
    trainer, data = _toy_trainer(tmp_path, **{"optim.grad_clip": clip})
    targets = trainer.model.targets
    names = [f"fc{m}" for m in range(len(targets))]
    config = peft.AdaLoraConfig(init_r=R, target_r=BUDGET // len(targets), lora_alpha=trainer.settings.alpha,
                                tinit=TINIT, tfinal=TFINAL, deltaT=DELTA_T, total_step=TOTAL, target_modules=names)
    ada = peft.get_peft_model(_Linears(targets), config).base_model
    layers = [getattr(ada.model, n) for n in names]
    clipped_norms = []
    budgets, flags = adalora.budget_tables(trainer.method_impl.schedule())  # what the jitted step indexes
    for step in range(1, TOTAL + 1):
        assert (int(budgets[step - 1]), bool(flags[step - 1])) == ada.rankallocator.budget_schedule(step - 1)
        trainer.train_step(next(data))
        state = jax.device_get(trainer.state)
        seen, grads = state["method"]["seen_slots"], state["method"]["seen_grads"]
        lora_params, head_grads = [], []
        for m, layer in enumerate(layers):
            for kind in "aeb":
                param = getattr(layer, f"lora_{kind.upper()}")["default"]
                param.data = _to_torch(kind, seen[kind][m])
                param.grad = _to_torch(kind, grads["slots"][kind][m])
                lora_params.append(param)
        for leaf in jax.tree.leaves(grads["head"]):
            head = torch.nn.Parameter(torch.zeros(np.shape(leaf)))
            head.grad = torch.from_numpy(np.array(leaf, np.float32))
            head_grads.append(head)
        clipped_norms.append(float(torch.nn.utils.clip_grad_norm_(lora_params + head_grads, clip)))
        ada.update_and_allocate(step - 1)

        alloc, importance = state["alloc"], state["method"]["importance"]
        pattern = ada.peft_config["default"].rank_pattern
        if pattern is None:
            assert np.all(alloc["committed"]), f"step {step}: rows masked before PEFT masked any"
        else:
            assert np.asarray(alloc["committed"]).tolist() == [pattern[f"{n}.lora_E.default"] for n in names], (
                f"step {step}: rank pattern differs from AdaLoraModel.update_and_allocate's")
        for m, (name, layer) in enumerate(zip(names, layers)):
            np.testing.assert_allclose(np.asarray(state["trainable"]["slots"]["e"][m]),
                                       layer.lora_E["default"].detach().numpy(), rtol=0, atol=0,
                                       err_msg=f"step {step} {name}: E after RankAllocator.mask_to_budget")
            for kind in "eab":
                key = f"{name}.lora_{kind.upper()}.default"
                for ema in ("exp_avg_ipt", "exp_avg_unc"):
                    mine = np.asarray(importance[ema][kind][m])
                    table = getattr(ada.rankallocator, ema)
                    if key in table:
                        ref = table[key].numpy()
                        ref = {"e": ref.reshape(-1), "a": ref, "b": ref.T}[kind]
                    else:  # PEFT's reset_ipt after the final mask empties its tables
                        assert step - 1 >= TOTAL - TFINAL, f"step {step}: {key} missing from RankAllocator.{ema}"
                        ref = np.zeros_like(mine)
                    np.testing.assert_allclose(mine, ref, rtol=2e-5, atol=1e-12,
                                               err_msg=f"step {step} {key} {ema}: RankAllocator.update_ipt")
    assert min(clipped_norms) > clip, "the check must exercise the clip"
    assert int(np.sum(state["alloc"]["rank"])) == BUDGET
    trainer.close()


# ------------------------------------------------------------------------------------------- refusals
def _method(**overrides):
    model = make_toy_model(hidden=16)
    settings = TrainerSettings.from_config(toy_config(**{**ADALORA, **overrides}))
    return adalora.AdaLoRA(settings, model.targets)


@pytest.mark.parametrize("overrides, message", [
    ({"adapter.adalora.tinit": 10, "adapter.adalora.tfinal": 6},
     "adapter.adalora: tinit + tfinal must be < total_steps to leave a budgeting phase, got tinit=10 + tfinal=6 = 16"
     " >= total_steps=16; lower tinit/tfinal or train longer (total_steps = this run's train steps; AdaLoRA's "
     "published tinit/tfinal, as in the GLUE presets, are for its full-length runs)"),
    ({"adapter.rank_budget": 17},
     "adapter.rank_budget=17 (AdaLoRA's target budget, the total rank it ends at) must be between 1 and the initial "
     "budget 4 modules x adapter.r_max=4 = 16"),
    ({"adapter.rank_budget": 0},
     "adapter.rank_budget=0 (AdaLoRA's target budget, the total rank it ends at) must be between 1 and the initial "
     "budget 4 modules x adapter.r_max=4 = 16"),
])
def test_settings_that_cannot_run_are_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        _method(**overrides)
    assert str(err.value) == message


def test_an_epoch_run_is_checked_when_its_length_is_known_before_any_step(tmp_path):
    """train.num_steps = -1 (epochs): the Trainer's 1-step placeholder passes; the real length is refused by
    ``train`` before the first step runs."""
    trainer, data = _toy_trainer(tmp_path, **{"train.num_steps": -1})
    with pytest.raises(ConfigError, match=r"^adapter\.adalora: tinit \+ tfinal must be < total_steps .* got tinit=3 "
                                          r"\+ tfinal=4 = 7 >= total_steps=5;"):
        trainer.train(data, 5, data.state, progress=False)
    assert trainer.step == 0
    trainer.close()


def test_a_short_run_of_the_glue_preset_says_the_published_schedule_needs_a_full_run():
    from adapad_jax.config.presets import glue_config

    config = glue_config("cola", epochs=10, batch_size=32, alpha=32, warmup=100, top_k=3, growth_interval=100,
                         orth_reg=0.3, adapter_dropout=0.0, classifier_dropout=0.0, adapter_weight_decay=0.0,
                         schedule="linear")
    config.adapter.method = "adalora"
    config.train.num_steps = 3
    model = make_toy_model(hidden=16)
    config.adapter.rank_budget = len(model.targets)
    settings = TrainerSettings.from_config(config)
    with pytest.raises(ConfigError) as err:
        adalora.AdaLoRA(settings, model.targets)
    assert "\n" not in str(err.value)
    assert "tinit=800 + tfinal=3500 = 4300 >= total_steps=3" in str(err.value)
    assert "published tinit/tfinal, as in the GLUE presets, are for its full-length runs" in str(err.value)


# Copied by hand from QingruZhang/AdaLoRA NLU/scripts/run_debertav3_<task>.sh (--init_warmup, --final_warmup,
# --mask_interval, --reg_orth_coef; --beta1/--beta2 0.85 in all), so a changed preset value is a visible edit.
PUBLISHED_SCHEDULES = {"cola": (800, 3500, 10, 0.1), "mnli": (8000, 50000, 100, 0.1), "mrpc": (600, 1800, 1, 0.1),
                       "qnli": (2000, 8000, 100, 0.1), "qqp": (8000, 25000, 100, 0.1), "rte": (600, 1800, 1, 0.3),
                       "sst2": (6000, 22000, 100, 0.1), "stsb": (800, 2000, 10, 0.3)}


@pytest.mark.parametrize("task", sorted(PUBLISHED_SCHEDULES))
def test_glue_configs_carry_adalora_published_schedule(task):
    import importlib.util
    from pathlib import Path

    from adapad_jax.config.validation import check_fields

    path = Path(__file__).resolve().parents[1] / "configs" / f"glue_{task}.py"
    spec = importlib.util.spec_from_file_location(f"config_glue_{task}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    block = config.adapter.adalora
    assert (block.tinit, block.tfinal, block.deltaT, block.orth_reg_weight) == PUBLISHED_SCHEDULES[task]
    assert (block.beta1, block.beta2) == (0.85, 0.85)
    config.adapter.method = "adalora"
    check_fields(config)


def test_native_export_settings_load_in_peft_when_the_run_length_is_unknown():
    """A checkpoint of an epoch-based run re-exported (the Trainer knows no length): ``total_step`` is the least
    PEFT's ``AdaLoraConfig`` accepts, so the native adapter still loads; with the length known it is the run's."""
    unknown = _method(**{"train.num_steps": -1}).native_settings()
    assert unknown["total_step"] == TINIT + TFINAL + 1
    known = _method().native_settings()
    assert known == {**unknown, "total_step": TOTAL}
    assert (known["init_r"], known["target_r"], known["lora_alpha"]) == (R, BUDGET // 4, 8.0)
    for settings in (unknown, known):
        peft.AdaLoraConfig(**settings, target_modules=["fc"])
    with pytest.raises(ValueError):
        peft.AdaLoraConfig(**{**unknown, "total_step": TINIT + TFINAL}, target_modules=["fc"])


# --------------------------------------------------------------------------------------------- resume
def test_resume_is_bit_exact(tmp_path):
    half = TOTAL // 2
    straight, data = _toy_trainer(tmp_path, "straight", **{"checkpoint.every_steps": half})
    straight.train(data, TOTAL, data.state, progress=False)

    first, data = _toy_trainer(tmp_path, "resumed", **{"checkpoint.every_steps": half})
    first.train(data, TOTAL, data.state, progress=False)  # the same run, killed after its step-`half` checkpoint
    first.close()
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / str(TOTAL))
    second, _ = _toy_trainer(tmp_path, "resumed", **{"checkpoint.every_steps": half})
    position = second.restore_or_init({"position": -1})
    assert second.step == half
    data = ToyBatches(second.model, planted_teacher(second.model, [2, 1, 0, 0]), 16, start=position["position"])
    second.train(data, TOTAL, data.state, progress=False)
    flat_a = jax.tree_util.tree_flatten_with_path(jax.device_get(straight.state))[0]
    flat_b = jax.tree_util.tree_flatten_with_path(jax.device_get(second.state))[0]
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
    assert sum(straight.ranks().values()) == BUDGET < 4 * R, "the resumed half must include masking"
    straight.close()
    second.close()


# ------------------------------------------------------------------------- real models: forward, export

def _auto(task):
    import transformers

    return {"classification": transformers.AutoModelForSequenceClassification,
            "qa": transformers.AutoModelForQuestionAnswering}[task]


def _trained(tmp_path_factory, family, task):
    """A few adalora steps on a tiny checkpoint (masking included), then both exports."""
    from adapad_jax.models.registry import load_model
    from adapad_jax.testing.tiny import build_tiny_deberta, build_tiny_qwen3

    root = tmp_path_factory.mktemp(f"adalora_{family}")
    build = build_tiny_deberta if family == "deberta" else build_tiny_qwen3
    num_labels = 3 if task == "classification" else 2
    path = build(root / "ckpt", task=task, num_labels=num_labels)
    model = load_model(str(path), task=task, num_labels=num_labels)
    modules = len(model.targets)
    cfg = toy_config(**{**ADALORA, "adapter.rank_budget": modules * R // 2, "adapter.init_std": 0.05,
                        "adapter.adalora.tinit": 1, "adapter.adalora.tfinal": 2, "adapter.adalora.deltaT": 1,
                        "train.num_steps": 6, "optim.learning_rate": 5e-2, "model.name_or_path": str(path),
                        "checkpoint.every_steps": 0})
    trainer = Trainer(model, cfg, make_mesh(1, 1), root / "out")
    trainer.restore_or_init({})
    rng = np.random.default_rng(0)
    trainer.train(iter([hf_batch(rng, task) for _ in range(6)]), 6, lambda: {}, progress=False)
    ranks = trainer.ranks()
    assert sum(ranks.values()) == modules * R // 2 and max(ranks.values()) > min(ranks.values())
    return trainer, path, export_trainer(trainer, root / "export"), hf_batch(rng, task, size=5)


@pytest.fixture(scope="module")
def deberta_run(tmp_path_factory):
    trainer, path, out, batch = _trained(tmp_path_factory, "deberta", "classification")
    yield trainer, path, out, batch
    trainer.close()


def _torch_inputs(batch):
    return {k: torch.tensor(batch[k]).long() for k in ("input_ids", "attention_mask")}



def test_deberta_lora_export_reproduces_predict(deberta_run):
    trainer, path, out, batch = deberta_run
    assert_peft_reproduces_predict(trainer, path, out / "adapter", batch, "classification")


def test_deberta_native_adalora_export_loads_in_peft_and_reproduces_predict(deberta_run):
    trainer, path, out, batch = deberta_run
    config = peft.PeftConfig.from_pretrained(str(out / "adapter_adalora"))
    assert isinstance(config, peft.AdaLoraConfig) and config.init_r == R
    pattern = np.asarray(jax.device_get(trainer.state["alloc"]["committed"]))
    kept = {t.hf_path: row.tolist() for t, row in zip(trainer.model.targets, pattern) if row.any()}
    assert config.rank_pattern == {f"{p}.lora_E": v for p, v in kept.items()}
    assert len(kept) < len(trainer.model.targets) or not pattern.all(), "the run should have masked some triplets"
    assert_peft_reproduces_predict(trainer, path, out / "adapter_adalora", batch, "classification")


def test_forward_and_orthogonal_penalty_equal_peft_adalora_with_the_same_weights(deberta_run):
    """PEFT's AdaLoRA model (``SVDLinear`` layers, ``AdaLoraModel.forward``'s regulariser) with the trainer's
    A, E, B (every row, as the train forward has them) and head: same logits as the trainer's train forward, and
    its loss minus the task loss equals the penalty the trainer adds."""
    from adapad_jax.models.export import head_tensors

    trainer, path, _, batch = deberta_run
    model, method = trainer.model, trainer.method_impl
    state = jax.device_get(trainer.state)
    slots = state["trainable"]["slots"]
    base = _auto("classification").from_pretrained(str(path))
    heads = head_tensors(model, model.to_hf_state_dict(trainer.trained_params()))
    missing = base.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in heads.items()}, strict=False)
    assert not missing.unexpected_keys
    config = peft.AdaLoraConfig(init_r=R, target_r=1, lora_alpha=trainer.settings.alpha, total_step=TOTAL,
                                orth_reg_weight=method.orth_reg_weight,
                                target_modules=[t.hf_path for t in model.targets], modules_to_save=None)
    ada = peft.get_peft_model(base, config)
    with torch.no_grad():
        for m, target in enumerate(model.targets):
            layer = ada.base_model.model.get_submodule(target.hf_path)
            for kind in "aeb":
                getattr(layer, f"lora_{kind.upper()}")["default"].data = _to_torch(kind, slots[kind][m])
        labels = torch.tensor(batch["labels"]).long()
        ada.eval()
        ref = ada.base_model(**_torch_inputs(batch), labels=labels)  # AdaLoraModel.forward adds the regulariser
        task_loss = torch.nn.functional.cross_entropy(ref.logits, labels)
    assert np.abs(np.asarray(slots["e"])).max() > 0 and not np.asarray(state["alloc"]["committed"]).all()
    every_row = {**state["alloc"], "committed": np.ones_like(state["alloc"]["committed"])}
    train_forward = trainer._eval(state["trainable"], every_row, state["method"], trainer.frozen,
                                  {k: batch[k] for k in trainer.input_keys})
    np.testing.assert_allclose(np.asarray(train_forward["logits"]), ref.logits.numpy(), rtol=1e-4, atol=1e-5)
    zero = jax.tree.map(np.zeros_like, state["trainable"])
    _, penalty, _ = method.penalty_and_scores(state["trainable"], zero, state["alloc"], state["method"])
    assert float(penalty) > 1e-3
    np.testing.assert_allclose(float(penalty), float(ref.loss - task_loss), rtol=1e-4)


@pytest.mark.slow
def test_qwen3_both_exports_reproduce_predict(tmp_path_factory):
    trainer, path, out, batch = _trained(tmp_path_factory, "qwen3", "qa")
    assert_peft_reproduces_predict(trainer, path, out / "adapter", batch, "qa")
    assert_peft_reproduces_predict(trainer, path, out / "adapter_adalora", batch, "qa")
    trainer.close()


@pytest.mark.slow
def test_tiny_glue_run_end_to_end_writes_both_adapters(tmp_path):
    """The run layer (``run.core.run``) on a tiny DeBERTa GLUE task: outputs consistent, PEFT reproduces the
    predictions from ``adapter/``, and ``adapter_adalora/`` loads as an AdaLoRA adapter with the run's ranks."""
    from test_e2e_runs import check_metrics_agree_with_predictions, check_outputs, check_peft_reproduces_jax
    from test_e2e_runs import tiny_run_config

    from adapad_jax.run import core as run_lib

    config = tiny_run_config(tmp_path, "glue_mrpc", "deberta", adapter__method="adalora", adapter__rank_budget=12)
    config.adapter.adalora.update(tinit=0, tfinal=1, deltaT=1)
    config.optim.learning_rate = 0.1  # E starts at 0: a few larger steps make the adapters matter
    result = run_lib.run(config, progress=False, keep_trainer=True, log=lambda _: None)
    try:
        assert result.step == config.train.num_steps and sum(result.ranks.values()) == 12
        check_outputs(result.output_dir, result.ranks)
        check_metrics_agree_with_predictions(config, result.output_dir)
        check_peft_reproduces_jax(config, result)
        native = peft.PeftConfig.from_pretrained(str(result.output_dir / "adapter_adalora"))
        assert isinstance(native, peft.AdaLoraConfig) and native.total_step == config.train.num_steps
        assert {k[: -len(".lora_E")]: sum(v) for k, v in native.rank_pattern.items()} == {
            k: v for k, v in result.ranks.items() if v}
    finally:
        result.trainer.close()


def test_a_resume_with_another_budget_keeps_the_rank_pattern_and_ends_at_the_new_budget(tmp_path):
    """The growth methods' budget change (``recovery.apply_budget_change``) would rebuild ``committed`` as a
    prefix of slots; AdaLoRA keeps its rank pattern and its schedule aims at the new target from the resume on."""
    half = TOTAL // 2
    first, data = _toy_trainer(tmp_path, "run", **{"checkpoint.every_steps": half})
    first.train(data, TOTAL, data.state, progress=False)
    first.close()
    shutil.rmtree(tmp_path / "run" / "checkpoints" / str(TOTAL))
    saved, _ = _toy_trainer(tmp_path, "run")
    saved.restore(half)
    pattern = np.asarray(jax.device_get(saved.state["alloc"]["committed"]))
    saved.close()
    assert not pattern.all() and not np.all(pattern[:, :1] | ~pattern.any(axis=1, keepdims=True)), pattern
    resumed, _ = _toy_trainer(tmp_path, "run", **{"adapter.rank_budget": BUDGET - 2})
    position = resumed.restore_or_init({"position": -1})
    np.testing.assert_array_equal(np.asarray(jax.device_get(resumed.state["alloc"]["committed"])), pattern)
    data = ToyBatches(resumed.model, planted_teacher(resumed.model, [2, 1, 0, 0]), 16, start=position["position"])
    resumed.train(data, TOTAL, data.state, progress=False)
    assert sum(resumed.ranks().values()) == BUDGET - 2
    resumed.close()
