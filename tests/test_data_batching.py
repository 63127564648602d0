"""Static-shape batching: seeded shuffling, exact resume, multi-process slices, padded eval batches."""

import numpy as np
import pytest

from adapad_jax.data import DataError, TrainBatches, concat_eval_outputs, eval_batches, num_eval_batches


def _features(n=23, seq=5):
    rows = np.arange(n)
    return {
        "input_ids": np.tile(rows[:, None], (1, seq)).astype(np.int32),
        "attention_mask": np.ones((n, seq), np.int32),
        "labels": (rows % 3).astype(np.int32),
        "idx": rows.astype(np.int64),  # host-side only, must not reach batches
    }


def _rows(batch):
    return batch["input_ids"][:, 0].tolist()


def test_train_batches_static_shapes_drop_last_and_cover_each_epoch_once():
    batches = TrainBatches(_features(23), batch_size=5, seed=0)
    assert batches.steps_per_epoch == 4  # 23 // 5, the last 3 rows of each permutation are dropped
    epoch = [next(batches) for _ in range(4)]
    for b in epoch:
        assert set(b) == {"input_ids", "attention_mask", "labels", "example_weight"}
        assert b["input_ids"].shape == (5, 5) and b["example_weight"].tolist() == [1.0] * 5
    seen = sum((_rows(b) for b in epoch), [])
    assert len(set(seen)) == 20
    assert seen == batches.epoch_order(0)[:20].tolist()
    assert _rows(next(batches)) == batches.epoch_order(1)[:5].tolist()


def test_shuffling_is_deterministic_by_seed_and_differs_across_epochs_and_seeds():
    first = [_rows(next(TrainBatches(_features(), 5, seed=7))) for _ in range(2)]
    assert first[0] == first[1]
    a = TrainBatches(_features(), 5, seed=7)
    assert not np.array_equal(a.epoch_order(0), a.epoch_order(1))
    assert not np.array_equal(a.epoch_order(0), TrainBatches(_features(), 5, seed=8).epoch_order(0))
    ordered = TrainBatches(_features(), 5, seed=7, shuffle=False)
    assert _rows(next(ordered)) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("stop_after", [0, 3, 4, 9])
def test_resume_from_state_dict_continues_exactly(stop_after):
    reference = TrainBatches(_features(), 5, seed=3)
    expected = [_rows(next(reference)) for _ in range(14)]
    first = TrainBatches(_features(), 5, seed=3)
    for _ in range(stop_after):
        next(first)
    state = first.state_dict()
    resumed = TrainBatches(_features(), 5, seed=3)
    resumed.load_state_dict(dict(state))
    assert resumed.global_step == stop_after
    assert [_rows(next(resumed)) for _ in range(14 - stop_after)] == expected[stop_after:]


def test_resume_refuses_a_different_run():
    state = TrainBatches(_features(), 5, seed=3).state_dict()
    with pytest.raises(DataError, match="seed"):
        TrainBatches(_features(), 5, seed=4).load_state_dict(state)
    with pytest.raises(DataError, match="num_examples"):
        TrainBatches(_features(30), 5, seed=3).load_state_dict(state)


def test_processes_get_disjoint_slices_of_the_global_batch():
    whole = TrainBatches(_features(), 6, seed=1)
    parts = [TrainBatches(_features(), 6, seed=1, process_index=p, process_count=3) for p in range(3)]
    for _ in range(5):
        global_rows = _rows(next(whole))
        local = [_rows(next(part)) for part in parts]
        assert all(len(rows) == 2 for rows in local)
        assert sum(local, []) == global_rows
    with pytest.raises(DataError, match="divisible"):
        TrainBatches(_features(), 5, seed=1, process_index=0, process_count=2)


def test_too_small_training_set_is_a_clear_error():
    with pytest.raises(DataError, match="fewer than one batch"):
        TrainBatches(_features(3), 5, seed=0)


def test_eval_batches_pad_last_batch_with_zero_weight_rows():
    features = _features(23)
    batches = list(eval_batches(features, 10))
    assert len(batches) == num_eval_batches(23, 10) == 3
    assert all(b["input_ids"].shape == (10, 5) for b in batches)
    assert _rows(batches[0]) == list(range(10))
    assert batches[2]["example_weight"].tolist() == [1.0] * 3 + [0.0] * 7
    assert batches[2]["attention_mask"].sum(axis=1).min() > 0  # padding rows are real rows, never all-masked
    weights = np.concatenate([b["example_weight"] for b in batches])
    assert weights.sum() == 23
    # outputs come back in order; dropping the padding recovers exactly one row per example
    outputs = [{"logits": b["input_ids"][:, :1].astype(np.float32)} for b in batches]
    joined = concat_eval_outputs(outputs, 23)
    assert joined["logits"][:, 0].tolist() == list(range(23))


def test_eval_batches_split_across_processes():
    features = _features(23)
    whole = list(eval_batches(features, 8))
    halves = [list(eval_batches(features, 8, process_index=p, process_count=2)) for p in range(2)]
    for g, (a, b) in zip(whole, zip(*halves)):
        assert _rows(a) + _rows(b) == _rows(g)
        assert np.concatenate([a["example_weight"], b["example_weight"]]).tolist() == g["example_weight"].tolist()
