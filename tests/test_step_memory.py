"""The memory claim behind adapter.slot_chunk_size's default: chunked slots hold about one LoRA step's temporaries.

Compile-only (XLA buffer assignment of the real train step on a tiny DeBERTaV3); nothing is timed.
"""

import pytest

from adapad_jax.models.registry import model_from_config
from adapad_jax.testing.tiny import tiny_deberta_config
from adapad_jax.studies.benchmarking import step_memory


@pytest.fixture(scope="module")
def model():
    return model_from_config(tiny_deberta_config(), task="classification", num_labels=2)


def test_chunked_slots_need_about_lora_memory_and_vmapped_slots_about_l_times(model):
    shape = {"batch_size": 8, "seq_len": 64}
    lora = step_memory(model, method="lora", live_slots=4, **shape)
    vmapped = step_memory(model, live_slots=4, slot_chunk_size=0, **shape)
    chunked = step_memory(model, live_slots=4, slot_chunk_size=1, **shape)
    assert vmapped["live_slots"] == chunked["live_slots"] == 4
    assert chunked["temp_bytes"] <= 1.3 * lora["temp_bytes"], (chunked, lora)
    assert vmapped["temp_bytes"] >= 2.5 * chunked["temp_bytes"], (vmapped, chunked)


def test_gradient_accumulation_holds_one_micro_batch_of_activations(model):
    """train.grad_accum_steps=4 runs a quarter of the batch at a time: about a quarter of the temporaries."""
    shape = {"batch_size": 16, "seq_len": 32, "live_slots": 2, "slot_chunk_size": 1}
    full = step_memory(model, **shape)
    micro = step_memory(model, grad_accum_steps=4, **shape)
    assert micro["temp_bytes"] <= 0.4 * full["temp_bytes"], (micro, full)
