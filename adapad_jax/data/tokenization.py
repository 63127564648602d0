"""The checkpoint's own tokenizer, set up for our pipelines (right padding, a pad token)."""

from __future__ import annotations

from typing import Any

from adapad_jax.data.tasks import DataError


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Make padding right-sided and make sure a pad token exists (eos stands in, as for Qwen); returns it."""
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise DataError(
                f"tokenizer {type(tokenizer).__name__} has neither a pad token nor an eos token to pad with"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(name_or_path: str) -> Any:
    """AutoTokenizer.from_pretrained(name_or_path), prepared with ``prepare_tokenizer``."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as err:  # noqa: BLE001 - transformers raises OSError / ValueError / others
        raise DataError(f"cannot load the tokenizer of '{name_or_path}': {str(err).splitlines()[0]}") from None
    return prepare_tokenizer(tokenizer)
