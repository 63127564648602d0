"""The tokenised-feature cache: hits skip tokenisation and give the same arrays; anything that changes the
features (data, tokenizer, settings) misses; broken or foreign files are ignored and rewritten."""

import os
import time

import numpy as np
import pytest

from adapad_jax.data import build_task_data, load_tokenizer
from adapad_jax.data import pipeline as pipeline_lib
from adapad_jax.data.feature_cache import default_cache_dir, tokenizer_fingerprint
from adapad_jax.testing.tiny import train_bpe_tokenizer, write_tiny_glue, write_tiny_squad


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bpe")
    train_bpe_tokenizer(directory)
    return load_tokenizer(str(directory))


@pytest.fixture
def tokenising(monkeypatch):
    """Counts calls of the pipeline's tokenising functions: a cache hit must not call them."""
    calls = {"count": 0}
    for name in ("tokenize_glue", "prepare_qa_train_features", "prepare_qa_eval_features"):
        original = getattr(pipeline_lib, name)

        def counted(*args, _original=original, **kwargs):
            calls["count"] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(pipeline_lib, name, counted)

    def since(start: int) -> int:
        return calls["count"] - start

    calls["since"] = since
    return calls


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_squad_v2_hit_gives_the_same_features_without_tokenising(tokenizer, tmp_path, tokenising):
    files = write_tiny_squad(tmp_path / "data", version=2, n_train=10, n_val=6, max_facts=14)
    kwargs = dict(train_file=files.train_file, validation_file=files.validation_file, max_length=48, doc_stride=12)
    cache = tmp_path / "cache"
    fresh = build_task_data("squad_v2", tokenizer, **kwargs)
    first = build_task_data("squad_v2", tokenizer, cache_dir=cache, **kwargs)
    assert len(list(cache.glob("*.npz"))) == 2 and not list(cache.glob("*.tmp"))
    start = tokenising["count"]
    second = build_task_data("squad_v2", tokenizer, cache_dir=cache, **kwargs)
    assert tokenising["since"](start) == 0
    for data in (first, second):
        _same(data.train, fresh.train)
        qa, ref = data.evals["validation"].qa, fresh.evals["validation"].qa
        _same(qa.arrays, ref.arrays)
        np.testing.assert_array_equal(qa.example_index, ref.example_index)
        np.testing.assert_array_equal(qa.offset_mapping, ref.offset_mapping)
        assert qa.example_id == ref.example_id and isinstance(qa.example_id[0], str)
    start = tokenising["count"]
    build_task_data("squad_v2", tokenizer, cache_dir=cache, **{**kwargs, "doc_stride": 16})
    assert tokenising["since"](start) == 2, "another stride is another entry"


def test_changed_file_tokenizer_or_length_misses(tokenizer, tmp_path, tokenising):
    files = write_tiny_glue(tmp_path / "a", "mrpc", n_train=8, n_val=4, seed=0)
    cache = tmp_path / "cache"
    base = build_task_data("glue_mrpc", tokenizer, train_file=files.train_file, validation_file=files.validation_file,
                           cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 2
    time.sleep(0.01)
    other = write_tiny_glue(tmp_path / "b", "mrpc", n_train=8, n_val=4, seed=1)
    os.replace(other.train_file, files.train_file)  # same path, new content
    start = tokenising["count"]
    changed = build_task_data("glue_mrpc", tokenizer, train_file=files.train_file,
                              validation_file=files.validation_file, cache_dir=cache)
    assert tokenising["since"](start) == 1, "only the changed train split is tokenised again"
    assert not np.array_equal(changed.train["input_ids"], base.train["input_ids"])
    reference = build_task_data("glue_mrpc", tokenizer, train_file=files.train_file,
                                validation_file=files.validation_file)
    _same(changed.train, reference.train)
    shorter = build_task_data("glue_mrpc", tokenizer, train_file=files.train_file,
                              validation_file=files.validation_file, max_length=32, cache_dir=cache)
    assert shorter.train["input_ids"].shape[1] == 32
    train_bpe_tokenizer(tmp_path / "bpe2", vocab_size=300)
    other_tokenizer = load_tokenizer(str(tmp_path / "bpe2"))
    assert tokenizer_fingerprint(other_tokenizer) != tokenizer_fingerprint(tokenizer)
    start = tokenising["count"]
    build_task_data("glue_mrpc", other_tokenizer, train_file=files.train_file, validation_file=files.validation_file,
                    cache_dir=cache)
    assert tokenising["since"](start) == 2


def test_broken_entry_is_recomputed_and_rewritten(tokenizer, tmp_path, tokenising):
    files = write_tiny_glue(tmp_path / "data", "sst2", n_train=6, n_val=3)
    cache = tmp_path / "cache"
    kwargs = dict(train_file=files.train_file, validation_file=files.validation_file, cache_dir=cache)
    first = build_task_data("glue_sst2", tokenizer, **kwargs)
    for entry in cache.glob("*.npz"):
        entry.write_bytes(entry.read_bytes()[:40])  # as if truncated
    start = tokenising["count"]
    second = build_task_data("glue_sst2", tokenizer, **kwargs)
    assert tokenising["since"](start) == 2
    _same(second.train, first.train)
    start = tokenising["count"]
    build_task_data("glue_sst2", tokenizer, **kwargs)
    assert tokenising["since"](start) == 0, "the rewritten entries are read again"


def test_cache_location_and_switch(tmp_path, monkeypatch):
    import ml_collections

    monkeypatch.setenv("ADAPAD_FEATURE_CACHE", str(tmp_path / "env"))
    assert default_cache_dir() == tmp_path / "env"
    monkeypatch.delenv("ADAPAD_FEATURE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "adapad_jax" / "features"
    config = ml_collections.ConfigDict({"data": {"cache_features": True, "cache_dir": ""}})
    assert pipeline_lib.feature_cache_dir(config) == str(tmp_path / "xdg" / "adapad_jax" / "features")
    config.data.cache_dir = str(tmp_path / "mine")
    assert pipeline_lib.feature_cache_dir(config) == str(tmp_path / "mine")
    config.data.cache_features = False
    assert pipeline_lib.feature_cache_dir(config) is None
