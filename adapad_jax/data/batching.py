"""Static-shape batches: seeded per-epoch shuffling with a resumable position, and padded eval batches.

Every batch is a dict of numpy arrays with a leading dimension of exactly the (per-process) batch size,
so a jitted step compiles once. With several processes each one gets its contiguous slice of the global
batch: rows ``[p * B / P, (p + 1) * B / P)``.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import numpy as np

from adapad_jax.data.tasks import DataError

# Keys of feature dicts that go into model batches; anything else (idx, ...) stays with the host.
BATCH_KEYS = (
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "labels",
    "start_positions",
    "end_positions",
)


def _num_rows(features: Mapping[str, np.ndarray]) -> int:
    lengths = {key: len(value) for key, value in features.items()}
    if not lengths or len(set(lengths.values())) != 1:
        raise DataError(f"feature arrays must be non-empty and share their length, got {lengths}")
    return next(iter(lengths.values()))


def _local_slice(batch_size: int, process_index: int, process_count: int) -> slice:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} is not in [0, process_count={process_count})")
    if batch_size < 1 or batch_size % process_count:
        raise DataError(f"global batch size {batch_size} must be positive and divisible by {process_count} processes")
    per_process = batch_size // process_count
    return slice(process_index * per_process, (process_index + 1) * per_process)


def _select(features: Mapping[str, np.ndarray], keys: tuple[str, ...], rows: np.ndarray) -> dict[str, np.ndarray]:
    return {key: np.asarray(features[key])[rows] for key in keys if key in features}


class TrainBatches:
    """Endless training batches: a seeded permutation per epoch, incomplete last batch dropped.

    The position (epoch, step in epoch) is a small dict from ``state_dict()``; ``load_state_dict`` resumes
    so that the next batch is exactly the one that would have come next.
    """

    def __init__(
        self,
        features: Mapping[str, np.ndarray],
        batch_size: int,
        seed: int,
        *,
        shuffle: bool = True,
        process_index: int = 0,
        process_count: int = 1,
        keys: tuple[str, ...] = BATCH_KEYS,
    ):
        self.features = features
        self.num_examples = _num_rows(features)
        self.batch_size = batch_size
        self.seed = int(seed)
        self.shuffle = shuffle
        self.keys = keys
        self._local = _local_slice(batch_size, process_index, process_count)
        self.steps_per_epoch = self.num_examples // batch_size
        if self.steps_per_epoch == 0:
            raise DataError(
                f"the training set has {self.num_examples} examples, fewer than one batch of {batch_size}"
            )
        self.epoch = 0
        self.step_in_epoch = 0
        self._order: np.ndarray | None = None

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of example rows used in ``epoch`` (identity without shuffling)."""
        if not self.shuffle:
            return np.arange(self.num_examples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

    def state_dict(self) -> dict[str, int]:
        """Position of the iterator, plus what must match on restore."""
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "seed": self.seed,
            "num_examples": self.num_examples,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume at a position saved by ``state_dict`` (same data, seed and batch size)."""
        for key in ("seed", "num_examples", "batch_size"):
            if int(state[key]) != getattr(self, key):
                raise DataError(
                    f"cannot resume the data iterator: saved {key}={state[key]} but this run has {getattr(self, key)}"
                )
        if not 0 <= int(state["step_in_epoch"]) <= self.steps_per_epoch or int(state["epoch"]) < 0:
            raise DataError(f"cannot resume the data iterator at an impossible position {dict(state)}")
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self._order = None

    @property
    def global_step(self) -> int:
        """Batches handed out since the start of training."""
        return self.epoch * self.steps_per_epoch + self.step_in_epoch

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch += 1
            self.step_in_epoch = 0
            self._order = None
        if self._order is None:
            self._order = self.epoch_order(self.epoch)
        start = self.step_in_epoch * self.batch_size
        rows = self._order[start : start + self.batch_size][self._local]
        batch = _select(self.features, self.keys, rows)
        batch["example_weight"] = np.ones(len(rows), dtype=np.float32)
        self.step_in_epoch += 1
        return batch


def num_eval_batches(num_examples: int, batch_size: int) -> int:
    """Global eval batches needed to cover ``num_examples`` (the last one padded)."""
    return -(-num_examples // batch_size)


def eval_batches(
    features: Mapping[str, np.ndarray],
    batch_size: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
    keys: tuple[str, ...] = BATCH_KEYS,
) -> Iterator[dict[str, np.ndarray]]:
    """Eval batches in order; the last is padded to full size with copies of row 0 of weight 0.

    Padding copies a real row (rather than zeros) so that no row has an all-zero attention mask.
    """
    num_examples = _num_rows(features)
    local = _local_slice(batch_size, process_index, process_count)
    for batch_index in range(num_eval_batches(num_examples, batch_size)):
        rows = np.arange(batch_index * batch_size, (batch_index + 1) * batch_size)
        weight = (rows < num_examples).astype(np.float32)
        rows = np.where(rows < num_examples, rows, 0)
        batch = _select(features, keys, rows[local])
        batch["example_weight"] = weight[local]
        yield batch


def concat_eval_outputs(outputs: list[Mapping[str, np.ndarray]], num_examples: int) -> dict[str, np.ndarray]:
    """Concatenate per-batch global outputs (in batch order) and drop the padding rows at the end."""
    if not outputs:
        raise DataError("no eval outputs to concatenate")
    joined = {key: np.concatenate([np.asarray(o[key]) for o in outputs]) for key in outputs[0]}
    for key, value in joined.items():
        if len(value) < num_examples:
            raise DataError(f"eval output '{key}' has {len(value)} rows, fewer than the {num_examples} examples")
    return {key: value[:num_examples] for key, value in joined.items()}
