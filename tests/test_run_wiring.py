"""Run wiring: Qwen3 without pad_token_id, targets_for_config, Trainer.restore, metrics truncation, ranks plot."""

from __future__ import annotations

import json
import os
import warnings

import jax
import numpy as np
import pytest

from adapad_jax.run import core as run_lib
from adapad_jax.run import saved_run
from adapad_jax.config.schema import base_config
from adapad_jax.models.checkpoint_io import CheckpointError
from adapad_jax.models.registry import load_hf_config, load_model, targets_for_config
from adapad_jax.testing import tiny
from adapad_jax.training import Trainer, make_mesh
from adapad_jax.outputs.rank_outputs import MetricsWriter, label_color, plot_ranks
from adapad_jax.testing.toy import ToyBatches, enable_compilation_cache, make_toy_model, planted_teacher, toy_config

enable_compilation_cache()


# ------------------------------------------------------------------------- Qwen3 config without pad_token_id


@pytest.mark.slow
def test_qwen3_without_pad_token_id_classifies_batches_and_exports_the_pad_id(tmp_path):
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    ckpt = tiny.build_tiny_qwen3(tmp_path / "ckpt", task="classification", seed=2, pad_token_id=None)
    assert AutoConfig.from_pretrained(ckpt).pad_token_id is None  # like Qwen/Qwen3-0.6B
    pad_id = AutoTokenizer.from_pretrained(ckpt).pad_token_id
    assert pad_id is not None
    files = tiny.write_tiny_glue(tmp_path / "data", "glue_sst2", n_train=16, n_val=6)
    config = base_config()
    config.task = "glue_sst2"
    config.output_dir = str(tmp_path / "run")
    config.model.name_or_path = str(ckpt)
    config.data.train_file, config.data.validation_file = files.train_file, files.validation_file
    config.data.max_length = 24
    config.adapter.r_max = 2
    config.adapter.rank_budget = 40
    config.adapter.init_std = 0.3
    config.train.num_steps = 2
    config.train.batch_size = 8
    config.train.eval_batch_size = 4
    config.checkpoint.every_steps = 2
    result = run_lib.run(config, progress=False, log=lambda _: None, keep_trainer=True)
    try:
        assert result.trainer.model.hf_config.pad_token_id == pad_id
        (split, eval_set), = result.data.evals.items()
        features = eval_set.features
    finally:
        result.trainer.close()

    out = saved_run.export_checkpoint(config.output_dir, merged=True, log=lambda _: None)
    merged_config = json.loads((out / "merged" / "config.json").read_text())
    assert merged_config["pad_token_id"] == pad_id
    # transformers on the merged checkpoint (independent reference) reproduces the run's predictions. The
    # reference runs in float64: init_std 0.3 drives this tiny model's residual stream to norm ~100 before the
    # final RMSNorm, where transformers' own float32 kernels drift by up to 8.6e-4 from the exact value (and
    # eager vs sdpa attention by 1.6e-4), while the JAX float32 run stays within 2e-5 of it.
    torch_model = AutoModelForSequenceClassification.from_pretrained(out / "merged").eval().double()
    with torch.no_grad():
        torch_logits = torch_model(
            input_ids=torch.as_tensor(features["input_ids"], dtype=torch.long),
            attention_mask=torch.as_tensor(features["attention_mask"], dtype=torch.long),
        ).logits.numpy()
    rows = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    by_idx = {row["idx"]: row["logits"] for row in rows}
    jax_logits = np.array([by_idx[int(i)] for i in features["idx"]])
    np.testing.assert_allclose(jax_logits, torch_logits, atol=2e-4)


def test_config_overrides_reach_the_models_hf_config(tmp_path):
    ckpt = tiny.build_tiny_qwen3(tmp_path / "ckpt", task="classification", seed=2, pad_token_id=None)
    model = load_model(str(ckpt), task="classification", config_overrides={"pad_token_id": 3})
    assert model.hf_config.pad_token_id == 3
    assert load_model(str(ckpt), task="classification").hf_config.pad_token_id is None


# ------------------------------------------------------------------------------------------ targets_for_config


@pytest.mark.parametrize(
    "family, task, names",
    [
        ("deberta", "classification", None),
        ("deberta", "qa", ("query_proj", "intermediate.dense")),
        ("qwen3", "classification", None),
        ("qwen3", "qa", ("down_proj", "q_proj")),
    ],
)
def test_targets_for_config_equals_the_loaded_models_targets(tmp_path, family, task, names):
    build = tiny.build_tiny_deberta if family == "deberta" else tiny.build_tiny_qwen3
    ckpt = build(tmp_path / "ckpt", task=task, seed=0)
    _, hf_config = load_hf_config(str(ckpt))
    expected = load_model(str(ckpt), task=task, target_names=names).targets
    assert targets_for_config(hf_config, task, names) == expected
    assert len(expected) > 0


def test_targets_for_config_rejects_unknown_families_and_names(tmp_path):
    from transformers import BertConfig

    with pytest.raises(CheckpointError, match="model_type 'bert' is not supported"):
        targets_for_config(BertConfig(), "classification", None)
    _, hf_config = load_hf_config(str(tiny.build_tiny_qwen3(tmp_path / "q", task="qa", seed=0)))
    with pytest.raises(ValueError, match="query_proj"):
        targets_for_config(hf_config, "qa", ("query_proj",))


# ---------------------------------------------------------------------------------------------- Trainer.restore


def test_restore_reads_another_runs_checkpoints_without_touching_them(tmp_path):
    model = make_toy_model(hidden=16)
    teacher = planted_teacher(model, [2, 1, 0, 0])
    overrides = {"checkpoint.every_steps": 1, "checkpoint.keep": 5, "adapter.init_std": 0.1}
    trainer = Trainer(model, toy_config(**overrides), make_mesh(1, 1), tmp_path / "run")
    trainer.restore_or_init({"position": 0})
    data = ToyBatches(model, teacher, 8)
    trainer.train(data, 2, data.state, progress=False)
    trained = jax.device_get(trainer.state)
    trainer.close()
    checkpoints = tmp_path / "run" / "checkpoints"
    in_progress = checkpoints / "3.orbax-checkpoint-tmp-99"  # as if the run were saving step 3 right now
    in_progress.mkdir()
    before = sorted(p.name for p in checkpoints.iterdir())

    reader = Trainer(model, toy_config(**overrides), make_mesh(1, 1), tmp_path / "scratch", checkpoint_dir=checkpoints)
    try:
        assert reader.restore() == {"position": 2}
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(reader.state), trained)
        assert reader.restore(1) == {"position": 1} and reader.step == 1
        with pytest.raises(ValueError, match=r"no checkpoint for step 7 .* available: \[1, 2\]"):
            reader.restore(7)
        with pytest.raises(RuntimeError, match="read-only"):
            reader.save({"position": 1})
    finally:
        reader.close()
    assert sorted(p.name for p in checkpoints.iterdir()) == before
    assert not (tmp_path / "scratch" / "checkpoints").exists()


def test_restore_without_checkpoints_says_so(tmp_path):
    trainer = Trainer(make_toy_model(hidden=16), toy_config(), make_mesh(1, 1), tmp_path)
    try:
        with pytest.raises(ValueError, match="no checkpoint to restore"):
            trainer.restore()
    finally:
        trainer.close()


# ------------------------------------------------------------------------------------------- metrics and plots


def test_truncate_after_keeps_earlier_records_and_replaces_the_file_atomically(tmp_path, monkeypatch):
    writer = MetricsWriter(tmp_path / "metrics.jsonl")
    for step in (1, 2, 3, 4):
        writer.write({"step": step, "loss": np.float32(step / 10)})
    writer.truncate_after(2)
    assert [json.loads(line)["step"] for line in writer.path.read_text().splitlines()] == [1, 2]

    before = writer.path.read_text()

    def crash(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    from adapad_jax.runtime.failures import OutputWriteError

    with pytest.raises(OutputWriteError, match="metrics not logged: cannot write .*metrics.jsonl: disk full"):
        writer.truncate_after(1)
    assert writer.path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temporary file left behind


def test_disabled_metrics_writer_writes_nothing(tmp_path):
    writer = MetricsWriter(tmp_path / "metrics.jsonl", enabled=False)
    writer.write({"step": 1})
    writer.truncate_after(0)
    assert not writer.path.exists()


def test_label_colour_is_dark_on_light_cells_and_light_on_dark_cells():
    from matplotlib import colormaps

    viridis = colormaps["viridis"]
    assert label_color(viridis(1.0)) == "black"  # yellow
    assert label_color(viridis(0.0)) == "white"  # dark purple
    assert label_color((1.0, 1.0, 1.0, 1.0)) == "black" and label_color((0.0, 0.0, 0.0, 1.0)) == "white"


@pytest.mark.parametrize("layers, types", [(1, 1), (2, 7), (24, 6)])
def test_plot_ranks_writes_a_png_without_warnings(tmp_path, layers, types):
    ranks = {f"model.layers.{i}.self_attn.t{j}_proj": (i + j) % 9 for i in range(layers) for j in range(types)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plot_ranks(tmp_path / "ranks.png", ranks, title="adapad: committed rank (total 123)")
    assert [str(w.message) for w in caught] == []
    assert (tmp_path / "ranks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_options_object_and_keywords_build_the_same_model(tmp_path):
    from adapad_jax.models.base import ModelOptions

    ckpt = tiny.build_tiny_qwen3(tmp_path / "ckpt", task="classification", seed=2)
    by_object = load_model(str(ckpt), ModelOptions(task="classification", adapter_dropout=0.1, seed=3))
    by_keywords = load_model(str(ckpt), task="classification", adapter_dropout=0.1, seed=3)
    assert by_object.module == by_keywords.module
    assert [t.hf_path for t in by_object.targets] == [t.hf_path for t in by_keywords.targets]
    for x, y in zip(jax.tree.leaves(by_object.params), jax.tree.leaves(by_keywords.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with pytest.raises(TypeError, match="not both"):
        load_model(str(ckpt), ModelOptions(task="classification"), seed=1)
