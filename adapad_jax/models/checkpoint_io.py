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


# What a hub download fetches: the config, the tokenizer files and one weight format (safetensors when the repo
# has it, else the PyTorch pickles) -- not TF/Flax/ONNX weights, READMEs or training artefacts.
HUB_CONFIG_PATTERNS = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "spm.model",
    "*.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
)
HUB_SAFETENSORS_PATTERNS = ("model.safetensors", "model.safetensors.index.json", "model-*.safetensors")
HUB_BIN_PATTERNS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin")


def _looks_like_hub_id(name: str) -> bool:
    return not name.startswith((".", "/", "~")) and name.count("/") <= 1 and bool(name.strip("/"))


def hub_download_patterns(repo_files: list[str]) -> list[str]:
    """``allow_patterns`` for a repo with these files: config + tokenizer + safetensors (else .bin) weights."""
    has_safetensors = any(name.endswith(".safetensors") and "/" not in name for name in repo_files)
    return list(HUB_CONFIG_PATTERNS + (HUB_SAFETENSORS_PATTERNS if has_safetensors else HUB_BIN_PATTERNS))


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def resolve_checkpoint_dir(name_or_path: str, revision: str | None = None) -> Path:
    """The local directory of a checkpoint: a directory as given, or a hub id from the HF cache / the hub.

    A hub id is downloaded on first use (config, tokenizer and weight files only) into the Hugging Face cache
    and read from there afterwards; with ``HF_HUB_OFFLINE=1`` (or no network) only the cache is used.
    ``revision``: branch, tag or commit of the hub repo (None or "" = the default branch).
    """
    path = Path(os.path.expanduser(str(name_or_path)))
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"model.name_or_path '{name_or_path}' is a file; give the checkpoint directory")
        if not (path / "config.json").exists():
            raise CheckpointError(f"model directory '{path}' has no config.json")
        return path
    if not _looks_like_hub_id(str(name_or_path)):
        raise CheckpointError(f"model directory '{name_or_path}' does not exist")
    return Path(download_checkpoint(str(name_or_path), revision or None))


def download_checkpoint(repo_id: str, revision: str | None = None) -> str:
    """Snapshot the config, tokenizer and weight files of a hub model into the HF cache; return its directory."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    where = f"model '{repo_id}'" + (f" at revision '{revision}'" if revision else "")
    online_error: Exception | None = None
    if not _hub_offline():
        try:
            info = HfApi().model_info(repo_id, revision=revision)
            patterns = hub_download_patterns([s.rfilename for s in info.siblings or ()])
            return snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=patterns)
        except RevisionNotFoundError:
            raise CheckpointError(f"{where}: the hub repo has no such revision (model.revision)") from None
        except GatedRepoError:
            raise CheckpointError(
                f"{where} is gated on the hub: accept its terms on the model page and log in (`hf auth login`)"
            ) from None
        except RepositoryNotFoundError:
            raise CheckpointError(
                f"{where} is neither a local directory nor a model on the hub "
                f"({_endpoint()}); check the name, or log in for a private repo"
            ) from None
        except Exception as err:  # noqa: BLE001 - no network / hub down: fall back to the local cache below
            online_error = err
    try:
        # Only config.json is required here (a cache filled by `hf download <repo> <files>` or by transformers is
        # fine too); the tokenizer and weight files are checked by their readers.
        return snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=["config.json"], local_files_only=True)
    except Exception as err:  # noqa: BLE001 - any cache miss means "not available offline"
        reason = (
            "HF_HUB_OFFLINE is set" if online_error is None
            else f"the hub could not be reached: {type(online_error).__name__}"
        )
        raise CheckpointError(
            f"{where} is not in the local Hugging Face cache "
            f"(HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}) and {reason}; download it with "
            f"`hf download {repo_id}` on a machine with network, or set model.name_or_path to a local directory "
            f"({type(err).__name__})"
        ) from None


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


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
