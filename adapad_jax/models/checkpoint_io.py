"""Finding a Hugging Face checkpoint on disk and reading its tensors into numpy."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file as load_safetensors


class CheckpointError(ValueError):
    """A model checkpoint that cannot be found or read; the message names the problem."""


_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def resolve_checkpoint_dir(name_or_path: str) -> Path:
    """Return the local directory of a checkpoint given a directory or a hub id in the local HF cache."""
    path = Path(os.path.expanduser(str(name_or_path)))
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"model.name_or_path '{name_or_path}' is a file; give the checkpoint directory")
        if not (path / "config.json").exists():
            raise CheckpointError(f"model directory '{path}' has no config.json")
        return path
    if str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") > 1:
        raise CheckpointError(f"model directory '{name_or_path}' does not exist")
    try:
        from huggingface_hub import snapshot_download

        cached = snapshot_download(repo_id=str(name_or_path), local_files_only=True)
    except Exception as err:  # noqa: BLE001 - any hub failure means "not available offline"
        raise CheckpointError(
            f"model '{name_or_path}' is neither a local directory nor in the local Hugging Face cache "
            f"(HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}); download it with "
            f"`hf download {name_or_path}` or set model.name_or_path to a local directory ({type(err).__name__})"
        ) from None
    return Path(cached)


def weight_files(checkpoint_dir: Path) -> list[Path]:
    """The weight files of a checkpoint directory, preferring safetensors, following shard indexes."""
    for name in _WEIGHT_FILES:
        candidate = checkpoint_dir / name
        if not candidate.exists():
            continue
        if name.endswith(".index.json"):
            index = json.loads(candidate.read_text())
            shards = sorted(set(index["weight_map"].values()))
            missing = [s for s in shards if not (checkpoint_dir / s).exists()]
            if missing:
                raise CheckpointError(f"checkpoint '{checkpoint_dir}' is missing shard files: {', '.join(missing)}")
            return [checkpoint_dir / s for s in shards]
        return [candidate]
    raise CheckpointError(
        f"checkpoint '{checkpoint_dir}' has no weights (looked for {', '.join(_WEIGHT_FILES)})"
    )


def _read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"'{path.name}' is a PyTorch pickle; install torch to read it, or convert the checkpoint to safetensors"
        ) from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    out = {}
    for name, tensor in state.items():
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        out[name] = tensor.numpy()
    return out


def read_state_dict(checkpoint_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint as numpy arrays (bf16 stays ml_dtypes.bfloat16 in safetensors)."""
    state: dict[str, np.ndarray] = {}
    for file in weight_files(Path(checkpoint_dir)):
        if file.suffix == ".safetensors":
            state.update(load_safetensors(str(file)))
        else:
            state.update(_read_torch_bin(file))
    return state
