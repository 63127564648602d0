"""SoRA on the method seam (``adapad_jax/methods/sora.py``, class ``SoRA``) in the Trainer.

The in-trainer gate optimiser and threshold are checked against a float64 NumPy re-derivation of
``TsinghuaC3I/SoRA`` fed the same gradients (each assertion names the rule and the reference file); the export
against ``peft.PeftModel.from_pretrained`` on tiny DeBERTaV3 and Qwen3 models.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest

from helpers_hf import assert_peft_reproduces_predict, hf_batch
from adapad_jax.run.core import export_trainer
from adapad_jax.adapters.slots import to_lora_collection
from adapad_jax.config.schema import ConfigError
from adapad_jax.methods import sora
from adapad_jax.testing.toy import ToyBatches, enable_compilation_cache, make_toy_model, planted_teacher, toy_config
from adapad_jax.training import Trainer, make_mesh
from adapad_jax.training.losses import loss_terms
from adapad_jax.training.step import merge_head

enable_compilation_cache()


@pytest.fixture(scope="module")
def toy():
    model = make_toy_model(hidden=16, num_layers=2, num_outputs=4)
    return model, planted_teacher(model, [2, 1, 0, 0])


def _sora(**overrides):
    return toy_config(**{"adapter.method": "sora", "adapter.r_max": 4, "checkpoint.every_steps": 0, **overrides})


def _losses(out_dir):
    return [json.loads(line)["loss"] for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def test_trainer_trains_sora_and_the_rank_is_the_count_of_nonzero_gates(toy, tmp_path):
    """Loss falls on the planted task; eta and xi zero gates; alloc['rank'] / ['committed'] follow the gates."""
    model, teacher = toy
    cfg = _sora(**{"adapter.sora.sparse_lambda": 1.0, "adapter.sora.sparse_lambda_2": 1e-2,
                   "optim.learning_rate": 2e-2})
    trainer = Trainer(model, cfg, make_mesh(1, 1), tmp_path)
    data = ToyBatches(model, teacher, 16)
    trainer.restore_or_init(data.state())
    state0 = jax.device_get(trainer.state)
    opt_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state0["opt_state"])[0]]
    assert opt_paths and not any("gates" in p for p in opt_paths), "the shared AdamW must not hold the gates"
    assert all(np.all(b == 0) for b in state0["trainable"]["slots"]["b"]), "src/lora.py: B = 0 at init"
    trainer.train(data, 40, data.state, progress=False)
    losses = _losses(tmp_path)
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:3])
    state = jax.device_get(trainer.state)
    gates = np.stack(state["trainable"]["gates"])
    np.testing.assert_array_equal(state["alloc"]["committed"], gates != 0)
    np.testing.assert_array_equal(state["alloc"]["rank"], (gates != 0).sum(axis=1))
    total = int(state["alloc"]["rank"].sum())
    assert 0 < total < gates.size, "some gates reach exactly 0, some stay"
    assert sorted(trainer.ranks().values()) == sorted(int(r) for r in (gates != 0).sum(axis=1))
    trainer.close()


def _task_grads(model, trainable, batch, scale):
    """dL/d(trainable) of the task loss for the gated forward ((x a^T) * g * alpha/r) b, written here."""

    def loss(tr):
        coefs = [g * scale for g in tr["gates"]]
        lora = to_lora_collection(model.targets, tr["slots"]["a"], tr["slots"]["b"], coefs)
        out = model.module.apply({"params": merge_head(model.params, tr["head"]), "lora": lora},
                                 batch["input_ids"], batch["attention_mask"], deterministic=True)
        numerator, denominator = loss_terms(model.task, out, batch)
        return numerator / denominator

    return jax.device_get(jax.grad(loss)(trainable))


def test_in_trainer_gate_step_matches_a_numpy_sparse_adamw(toy, tmp_path):
    """Six trainer steps against NumPy, step by step, from the trainer's own pre-step parameters:
    L1 gradient (src/trainer.py compute_loss), clipping of every gradient together (transformers Trainer,
    clip_grad_norm_), SparseAdamW (src/sparse_optimizer.py), the gate lr schedule (run_glue.py
    get_linear_schedule_with_warmup) and the xi stages (sparse_optimizer.py _build_lambda_list / step_lambda)."""
    model, teacher = toy
    steps, warmup, sparse_lr, eta, clip = 6, 2, 0.05, 0.5, 0.05
    xi0, xi_max, num, stage_steps = 0.01, 0.05, 3, 2
    cfg = _sora(**{"train.num_steps": steps, "optim.warmup_steps": warmup, "optim.grad_clip": clip,
                   "optim.schedule": "cosine", "adapter.sora.sparse_lr": sparse_lr,
                   "adapter.sora.sparse_lambda": eta, "adapter.sora.sparse_lambda_2": xi0,
                   "adapter.sora.lambda_schedule": "linear", "adapter.sora.max_lambda": xi_max,
                   "adapter.sora.lambda_num": num, "adapter.sora.stage_steps": stage_steps})
    trainer = Trainer(model, cfg, make_mesh(1, 1), tmp_path)
    trainer.restore_or_init({})
    scale = trainer.scaling
    assert scale == pytest.approx(8.0 / 4), "src/lora.py: alpha / r"
    data = ToyBatches(model, teacher, 16)
    gates0 = [np.asarray(g, np.float64) for g in jax.device_get(trainer.state["trainable"]["gates"])]
    m = [np.zeros_like(g) for g in gates0]
    v = [np.zeros_like(g) for g in gates0]
    count = sum(g.size for g in gates0)
    xi_list = np.linspace(xi0, xi_max, num)  # sparse_optimizer.py _build_lambda_list, "linear"
    zeroed = 0
    for t in range(1, steps + 1):
        batch = next(data)
        before = jax.device_get(trainer.state)
        grads = _task_grads(model, before["trainable"], batch, scale)
        p = [np.asarray(g, np.float64) for g in before["trainable"]["gates"]]
        g_gate = [np.asarray(g, np.float64) + eta * np.sign(q) / count for g, q in zip(grads["gates"], p)]
        leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves({**grads, "gates": g_gate})]
        norm = math.sqrt(sum(float((x * x).sum()) for x in leaves))
        g_gate = [g * min(1.0, clip / (norm + 1e-6)) for g in g_gate]  # torch clip_grad_norm_
        # run_glue.py sparse_scheduler: get_linear_schedule_with_warmup, stepped after each optimizer step
        lr = sparse_lr * ((t - 1) / warmup if t - 1 < warmup else max(0.0, (steps - t + 1) / (steps - warmup)))
        xi = xi_list[min((t - 1) // stage_steps, num - 1)]  # one step_lambda per stage of stage_steps steps
        expected = []
        for k in range(len(p)):
            m[k] = 0.9 * m[k] + 0.1 * g_gate[k]
            v[k] = 0.999 * v[k] + 0.001 * g_gate[k] ** 2
            step_size = lr * math.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t)
            q = p[k] - step_size * m[k] / (np.sqrt(v[k]) + 1e-6)
            q[q > xi] -= xi
            q[q < -xi] += xi
            q[np.abs(q) < xi] = 0.0
            expected.append(q)
        trainer.train_step(batch)
        after = jax.device_get(trainer.state)
        for k in range(len(p)):
            np.testing.assert_array_equal(after["trainable"]["gates"][k] == 0, expected[k] == 0,
                                          err_msg=f"step {t} module {k}: zero gates, sparse_optimizer.py threshold")
            np.testing.assert_allclose(after["trainable"]["gates"][k], expected[k], rtol=2e-5, atol=1e-7,
                                       err_msg=f"step {t} module {k}: SparseAdamW.step, sparse_optimizer.py")
            np.testing.assert_allclose(after["method"]["gate_adam"]["exp_avg"][k], m[k], rtol=2e-5, atol=1e-9,
                                       err_msg=f"step {t}: exp_avg, sparse_optimizer.py")
        assert int(after["method"]["gate_adam"]["count"]) == t, "sparse_optimizer.py: state['step'] += 1"
        np.testing.assert_array_equal(after["alloc"]["rank"], [int((q != 0).sum()) for q in expected])
        zeroed += sum(int((q == 0).sum()) for q in expected)
    assert zeroed > 0, "the threshold should have zeroed some gates for the comparison to test it"
    trainer.close()


def test_a_zero_gate_revives(toy, tmp_path):
    """A gate at exactly 0 is not committed; its Adam momentum and new gradient carry it past xi again
    (src/sparse_optimizer.py thresholds after every step, nothing is pruned for good)."""
    model, teacher = toy
    trainer = Trainer(model, _sora(**{"optim.warmup_steps": 0, "adapter.sora.sparse_lambda_2": 1e-4,
                                      "adapter.sora.sparse_lambda": 0.0, "optim.learning_rate": 0.1}),
                      make_mesh(1, 1), tmp_path)
    trainer.restore_or_init({})
    state = jax.device_get(trainer.state)
    gates = [np.array(g) for g in state["trainable"]["gates"]]
    gates[0][0] = 0.0
    adam = state["method"]["gate_adam"]
    exp_avg = [np.array(x) for x in adam["exp_avg"]]
    exp_avg_sq = [np.array(x) for x in adam["exp_avg_sq"]]
    exp_avg[0][0], exp_avg_sq[0][0] = -1.0, 1.0  # momentum pushing gate 0 up
    committed = np.array(state["alloc"]["committed"])
    committed[0, 0] = False
    state = {**state, "trainable": {**state["trainable"], "gates": gates},
             "alloc": {**state["alloc"], "committed": committed, "rank": committed.sum(axis=1).astype(np.int32)},
             "method": {"gate_adam": {**adam, "count": np.int32(5), "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}}}
    trainer.state = jax.device_put(state, trainer.state_shardings(state))
    assert trainer.ranks()["toy.layers.0.fc_in"] == 3
    trainer.train(ToyBatches(model, teacher, 16), 1, lambda: {}, progress=False)
    after = jax.device_get(trainer.state)
    assert after["trainable"]["gates"][0][0] != 0
    assert after["alloc"]["committed"][0, 0] and trainer.ranks()["toy.layers.0.fc_in"] == 4
    trainer.close()


def test_resume_is_bit_exact(toy, tmp_path):
    """N steps + checkpoint + restore + N steps == 2N straight: gates, their AdamW state and alloc included."""
    model, teacher = toy
    n = 3
    cfg = _sora(**{"checkpoint.every_steps": n, "adapter.sora.sparse_lambda_2": 0.3,
                   "adapter.sora.lambda_schedule": "linear", "adapter.sora.max_lambda": 0.5,
                   "adapter.sora.lambda_num": 3, "adapter.sora.stage_steps": 2})
    straight = Trainer(model, cfg, make_mesh(1, 1), tmp_path / "straight")
    data = ToyBatches(model, teacher, 8)
    straight.restore_or_init(data.state())
    straight.train(data, 2 * n, data.state, progress=False)
    first = Trainer(model, cfg, make_mesh(1, 1), tmp_path / "split")
    data = ToyBatches(model, teacher, 8)
    first.restore_or_init(data.state())
    first.train(data, n, data.state, progress=False)
    first.close()
    second = Trainer(model, cfg, make_mesh(1, 1), tmp_path / "split")
    position = second.restore_or_init({"position": -1})
    assert position == {"position": n}
    data = ToyBatches(model, teacher, 8, start=position["position"])
    second.train(data, 2 * n, data.state, progress=False)
    a, b = jax.device_get(straight.state), jax.device_get(second.state)
    flat_a, flat_b = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
    assert int(a["method"]["gate_adam"]["count"]) == 2 * n
    straight.close()
    second.close()



def test_mesh_run_matches_single_device(toy, tmp_path):
    """data=2 x components=2 trains SoRA as one device does (the joint forward is replicated over components)."""
    from test_train_equivalence import assert_close_to_scale

    model, teacher = toy
    states = []
    for data, components in ((1, 1), (2, 2)):
        trainer = Trainer(model, _sora(**{"adapter.sora.sparse_lambda_2": 0.2}), make_mesh(data, components),
                          tmp_path / f"{data}x{components}")
        batches = ToyBatches(model, teacher, 16)
        trainer.restore_or_init(batches.state())
        trainer.train(batches, 4, batches.state, progress=False)
        states.append(jax.device_get(trainer.state))
        trainer.close()
    single, mesh = states
    np.testing.assert_array_equal(single["alloc"]["committed"], mesh["alloc"]["committed"])
    assert not single["alloc"]["committed"].all(), "xi 0.2 should have zeroed some gates"
    for path, x, y in zip(*zip(*jax.tree_util.tree_leaves_with_path(single)), jax.tree.leaves(mesh)):
        assert_close_to_scale(x, y, jax.tree_util.keystr(path))

@pytest.mark.parametrize("overrides, needle", [
    ({"adapter.sora.lambda_schedule": "linear"}, "adapter.sora.stage_steps must be >= 1"),
    ({"adapter.sora.lambda_schedule": "exp_linear", "adapter.sora.sparse_lambda_2": 0.0,
      "adapter.sora.stage_steps": 5}, "adapter.sora.lambda_schedule: sora: exp_linear needs xi > 0"),
])
def test_bad_settings_are_refused_in_one_line_before_compute(toy, tmp_path, overrides, needle):
    model, _ = toy
    with pytest.raises(ConfigError) as err:
        Trainer(model, _sora(**overrides), make_mesh(1, 1), tmp_path)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_accounting_keeps_gates_apart_and_offers_the_reference_count(toy):
    """extra_parameters: one gate per kept rank; paper_parameter_count: src/util.py's (sparse, total)."""
    from adapad_jax.methods.registry import build_method
    from adapad_jax.training.settings import TrainerSettings

    model, _ = toy
    method = build_method(TrainerSettings.from_config(_sora()), model.targets)
    gates = [np.array([1.0, 0.0, 0.0, 2.0]), np.zeros(4), np.array([0.5, 0.5, 0.5, 0.5]), np.zeros(4)]
    ranks = {t.hf_path: int((g != 0).sum()) for t, g in zip(model.targets, gates)}
    counts = method.parameter_counts(ranks)
    sizes = [t.in_features + t.out_features for t in model.targets]
    assert counts["factors"] == 2 * sizes[0] + 4 * sizes[2]
    assert counts["with_extras"] == counts["factors"] + 6
    shapes = [(t.in_features, t.out_features) for t in model.targets]
    assert method.paper_parameter_count(gates, 16, 7) == sora.reference_count(gates, shapes, 16, 7)
    # by hand: full rank 4 everywhere + 7 other, minus 2 * hidden per zero gate (10 of them)
    total = 4 * sum(sizes) + 7
    assert method.paper_parameter_count(gates, 16, 7) == (total - 10 * 2 * 16, total)



@pytest.mark.slow  # ~90 s each on a loaded 2-core machine (model build, compile, torch + PEFT)
@pytest.mark.parametrize("family,task", [("deberta", "classification"), ("qwen3", "qa")])
def test_export_loads_in_peft_and_reproduces_predict(tmp_path, family, task):
    """Zero-gate rows dropped, g folded into B, all-zero modules left out; PEFT logits == trainer.predict."""

    from adapad_jax.models.registry import load_model
    from adapad_jax.testing.tiny import build_tiny_deberta, build_tiny_qwen3

    build = build_tiny_deberta if family == "deberta" else build_tiny_qwen3
    num_labels = 3 if task == "classification" else 2
    path = build(tmp_path / "ckpt", task=task, num_labels=num_labels)
    model = load_model(str(path), task=task, num_labels=num_labels)
    # xi 0.5 zeroes every gate with |g| < 1 at the first step: rows and whole modules drop out.
    cfg = _sora(**{"adapter.sora.sparse_lambda_2": 0.5, "optim.learning_rate": 5e-2, "optim.warmup_steps": 0,
                   "model.name_or_path": str(path)})
    trainer = Trainer(model, cfg, make_mesh(1, 1), tmp_path / "out")
    trainer.restore_or_init({})
    rng = np.random.default_rng(0)
    trainer.train(iter([hf_batch(rng, task) for _ in range(3)]), 3, lambda: {}, progress=False)
    ranks = trainer.ranks()
    assert 0 in ranks.values() and any(0 < r < 4 for r in ranks.values()), ranks
    factors = trainer.committed_peft_factors()
    assert set(factors) == {p for p, r in ranks.items() if r > 0}
    assert all(a.shape[0] == ranks[p] for p, (a, _) in factors.items())
    out = export_trainer(trainer, tmp_path / "export")
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert set(config["rank_pattern"].values()) | {config["r"]} >= {r for r in ranks.values() if r > 0}

    assert_peft_reproduces_predict(trainer, path, out / "adapter", hf_batch(rng, task, size=5), task)
    trainer.close()


def test_glue_presets_fill_adapter_sora_with_the_published_scripts_values():
    """scripts/run_glue_sora_no_schedule.sh (STS-B: eta 10, xi 3e-4), run_glue_sora_schedule_dense.sh (RTE: eta
    1e-3, xi 0 in the main run), run_glue.py SparseArguments defaults elsewhere (1e-3, 1e-3); the presets' shared
    settings are untouched and the config validates with method=sora."""
    from adapad_jax.config import validation
    from test_config import load_config_file
    from adapad_jax.methods.registry import build_method
    from adapad_jax.training.settings import TrainerSettings

    expected = {"stsb": (10.0, 3e-4), "rte": (1e-3, 0.0), "cola": (1e-3, 1e-3), "mnli": (1e-3, 1e-3)}
    for task, (eta, xi) in expected.items():
        _, config = load_config_file(f"glue_{task}")
        assert (config.adapter.sora.sparse_lambda, config.adapter.sora.sparse_lambda_2) == (eta, xi), task
        assert config.adapter.sora.sparse_lr == 0.0 and config.adapter.sora.lambda_schedule == ""
        assert config.adapter.r_max == 4, "the shared like-for-like r_max stays the preset's"
        config.adapter.method = "sora"
        validation.check_method_blocks(config)
    model = make_toy_model(hidden=16, num_layers=2, num_outputs=4)
    method = build_method(TrainerSettings.from_config(config), model.targets)
    assert (method.num_slots, method.scaling) == (4, config.adapter.alpha / 4)
    from adapad_jax.config.sora_presets import TABLE3_BUDGET

    for dotted, value in TABLE3_BUDGET.items():  # the Table 3 preset names real fields (r = 4: SoRA's 0.47M row)
        node = config
        *parents, leaf = dotted.split(".")
        for name in parents:
            node = node[name]
        assert leaf in node
        node[leaf] = value
    validation.check_method_blocks(config)
    assert config.adapter.r_max == 4


@pytest.mark.slow  # ~90 s: the documented command on tiny local stand-ins of DeBERTaV3 and CoLA
def test_the_glue_cola_command_runs_sora_end_to_end(tmp_path):
    """``launch/train.py --config configs/glue_cola.py --config.adapter.method=sora`` (tiny checkpoint and data):
    every output, ranks.json = the nonzero gates' count, the PEFT adapter's rank_pattern the nonzero ranks."""
    import subprocess
    import sys

    from adapad_jax.testing import tiny

    tiny.build_tiny_deberta(tmp_path / "ckpt", task="classification", num_labels=2, seed=1)
    files = tiny.write_tiny_glue(tmp_path / "data", "glue_cola", n_train=32, n_val=12)
    out = tmp_path / "run"
    root = Path(__file__).resolve().parents[1]
    args = [sys.executable, str(root / "launch" / "train.py"), "--config", str(root / "configs" / "glue_cola.py"),
            "--config.adapter.method=sora", f"--config.model.name_or_path={tmp_path / 'ckpt'}",
            f"--config.data.train_file={files.train_file}", f"--config.data.validation_file={files.validation_file}",
            "--config.train.num_steps=6", "--config.train.batch_size=8", "--config.data.max_length=32",
            f"--config.output_dir={out}", "--config.adapter.sora.sparse_lambda_2=0.2",
            "--config.train.eval_every_steps=3", "--config.checkpoint.every_steps=3", "--config.optim.warmup_steps=1"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = json.loads((out / "ranks.json").read_text())
    assert 0 < sum(ranks.values()) < 4 * len(ranks), "xi 0.2 zeroes some of the r_max = 4 gates per module"
    results = json.loads((out / "eval_results.json").read_text())
    assert results["rank"]["total_rank"] == sum(ranks.values())
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["rank_pattern"].values()) == sorted(r for r in ranks.values() if r > 0)
    config = json.loads((out / "config.json").read_text())
    assert config["adapter"]["sora"]["sparse_lambda"] == 1e-3, "the CoLA preset's eta (run_glue.py default)"
