"""End-of-training files: ranks.json, ranks.png (layers x module types), metrics.jsonl."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from adapad_jax.outputs.output_set import dumps_strict

_LAYER = re.compile(r"(?:^|\.)(?:layer|layers|h|blocks)\.(\d+)\.(.+)$")


def layer_and_type(hf_path: str) -> tuple[int, str]:
    """``"...layer.3.attention.self.query_proj"`` -> ``(3, "attention.self.query_proj")``; -1 if no layer index."""
    match = _LAYER.search(hf_path)
    if match is None:
        return -1, hf_path
    return int(match.group(1)), match.group(2)


def write_ranks_json(path: str | Path, ranks: Mapping[str, int]) -> None:
    """``{hf_path: rank}`` as indented JSON."""
    Path(path).write_text(json.dumps({k: int(v) for k, v in ranks.items()}, indent=2) + "\n")


def rank_grid(ranks: Mapping[str, int]) -> tuple[np.ndarray, list[int], list[str]]:
    """Ranks as a [layers, module types] grid (NaN where a module is absent), with row and column labels."""
    parsed = [(layer_and_type(path), rank) for path, rank in ranks.items()]
    layers = sorted({layer for (layer, _), _ in parsed})
    types: list[str] = []
    for (_, kind), _ in parsed:
        if kind not in types:
            types.append(kind)
    grid = np.full((len(layers), len(types)), np.nan)
    for (layer, kind), rank in parsed:
        grid[layers.index(layer), types.index(kind)] = rank
    return grid, layers, types


def label_color(rgba: Sequence[float]) -> str:
    """Text colour readable on a cell of colour ``rgba``: black on light cells, white on dark ones."""
    red, green, blue = rgba[:3]
    return "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"


def plot_ranks(path: str | Path, ranks: Mapping[str, int], title: str = "committed rank per module") -> None:
    """Save a heatmap of ranks: rows = layers, columns = module types."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid, layers, types = rank_grid(ranks)
    fig, ax = plt.subplots(figsize=(2.0 + 0.9 * len(types), 1.5 + 0.35 * len(layers)), layout="constrained")
    image = ax.imshow(grid, cmap="viridis", aspect="auto", vmin=0)
    ax.set_xticks(range(len(types)), types, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=8)
    ax.set_xlabel("module type")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if not np.isnan(grid[i, j]):
                cell = image.cmap(image.norm(grid[i, j]))
                ax.text(j, i, f"{int(grid[i, j])}", ha="center", va="center", color=label_color(cell), fontsize=7)
    fig.colorbar(image, ax=ax)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    array = np.asarray(value)
    if array.ndim == 0:
        return array.item()
    return array.tolist()


def _not_logged(err: OSError, path: Path) -> Exception:
    from adapad_jax.runtime.failures import OutputWriteError, describe_os_error

    return OutputWriteError(f"metrics not logged: {describe_os_error(err, path)}")


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl``; writes nothing when not ``enabled``."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one record (numpy/jax values converted)."""
        if not self.enabled:
            return
        try:
            with self.path.open("a") as handle:
                handle.write(dumps_strict(_jsonable(dict(record))) + "\n")
        except OSError as err:
            raise _not_logged(err, self.path) from None

    def truncate_after(self, step: int) -> None:
        """Drop records with ``step`` > ``step`` (left by a run that died after its last checkpoint).

        The file is rewritten through a temporary file and a rename, so a crash keeps the old version whole.
        """
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        try:
            handle, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        except OSError as err:
            raise _not_logged(err, self.path) from None
        try:
            with os.fdopen(handle, "w") as f:
                f.write("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        except BaseException as err:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(err, OSError):
                raise _not_logged(err, self.path) from None
            raise


def write_allocator_json(path: Path, scaling: float, method: str, step: int, alloc: Any) -> None:
    """The allocator's view at ``step``: the scaling and each module's importance / uncertainty EMAs."""
    path.write_text(dumps_strict({
        "scaling": scaling, "method": method, "step": step,
        "importance_ema": np.asarray(alloc["imp_ema"]).tolist(),
        "uncertainty_ema": np.asarray(alloc["unc_ema"]).tolist(),
    }, indent=2) + "\n")


def export_trainer(trainer: Any, out_dir: str | Path | None = None) -> Path:
    """Write ranks.json, ranks.png, allocator.json and (when the exporter is available) the PEFT adapter in
    ``adapter/`` from ``trainer``'s current state, to ``out_dir`` (default: its output_dir).

    Every process must call it (the adapters are gathered); only process 0 writes.
    """
    from adapad_jax.training import recovery

    out = Path(out_dir) if out_dir is not None else trainer.output_dir
    recovery.require_finite(trainer.state, trainer.step, "export")
    params, factors = trainer.trained_params(), trainer.committed_peft_factors()
    # A method with a native PEFT form of its own (adalora: AdaLoraConfig) writes it beside adapter/.
    native = getattr(trainer.method_impl, "export_native", None) if trainer.model.exports_to_peft else None
    host = _gathered({"trainable": trainer.state["trainable"], "alloc": trainer.state["alloc"],
                      "method": trainer.state.get("method", {})}) if native is not None else None
    if not trainer.writes_files:
        return out
    out.mkdir(parents=True, exist_ok=True)
    ranks = trainer.ranks()
    write_ranks_json(out / "ranks.json", ranks)
    plot_ranks(out / "ranks.png", ranks, title=f"{trainer.method}: committed rank (total {sum(ranks.values())})")
    if trainer.model.exports_to_peft:
        from adapad_jax.models.export import write_peft_adapter

        write_peft_adapter(out / "adapter", trainer.model, params, factors, trainer.scaling,
                           trainer.settings.model_name_or_path)
    if native is not None:
        native(out, trainer.model, params, host, trainer.settings.model_name_or_path)
    write_allocator_json(out / "allocator.json", trainer.scaling, trainer.method, trainer.step,
                         trainer.state["alloc"])
    return out


def _gathered(tree: Any) -> Any:
    """Numpy copy of a tree of global arrays (every process joins the gather), as ``Trainer`` gathers."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)
