"""The model card (``adapter/README.md``) of an exported adapter: what it is, how it was trained, how to load it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from adapad_jax.training.outputs import layer_and_type

# transformers Auto class per task kind, for the loading snippet.
_AUTO_CLASSES = {
    "classification": "AutoModelForSequenceClassification",
    "regression": "AutoModelForSequenceClassification",
    "qa": "AutoModelForQuestionAnswering",
}
_METHODS = {
    "adapad": "AdaPaD (adaptive parallel deflation: rank-1 slots trained in parallel against deflation targets, "
              "ranks discovered by importance x uncertainty)",
    "joint": "joint adaptive-rank baseline (same allocator, all slots trained together, IncreLoRA-style)",
    "lora": "fixed-rank LoRA baseline",
}


def metrics_at_step(run_dir: str | os.PathLike, step: int) -> dict[str, float]:
    """The evaluation metrics a run logged at ``step`` (eval_results.json, else metrics.jsonl); {} if none."""
    run_dir = Path(run_dir)
    results = run_dir / "eval_results.json"
    if results.is_file():
        saved = json.loads(results.read_text())
        if saved.get("step") == step and isinstance(saved.get("metrics"), dict):
            return saved["metrics"]
    found: dict[str, float] = {}
    log = run_dir / "metrics.jsonl"
    if log.is_file():
        for line in log.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("step") == step and isinstance(row.get("eval"), dict):
                found = row["eval"]
    return found


def _rank_summary(ranks: Mapping[str, int]) -> list[str]:
    """Markdown lines: total rank, modules with rank > 0, rank per module type and per layer."""
    by_type: dict[str, int] = {}
    by_layer: dict[int, int] = {}
    for path, rank in ranks.items():
        layer, kind = layer_and_type(path)
        by_type[kind] = by_type.get(kind, 0) + int(rank)
        by_layer[layer] = by_layer.get(layer, 0) + int(rank)
    active = sum(1 for r in ranks.values() if r > 0)
    lines = [
        f"- total rank **{sum(ranks.values())}** over {len(ranks)} adapted modules ({active} with rank > 0, "
        f"max {max(ranks.values(), default=0)})",
        "- rank per module type: " + ", ".join(f"`{k}` {v}" for k, v in by_type.items()),
        "- rank per layer: " + ", ".join(f"{k}: {v}" for k, v in sorted(by_layer.items())),
    ]
    return lines


def _loading_snippet(base: str, revision: str, kind: str, num_labels: int, is_qwen3: bool) -> str:
    auto = _AUTO_CLASSES[kind]
    rev = f", revision={revision!r}" if revision else ""
    labels = f", num_labels={num_labels}" if kind != "qa" else ""
    lines = ["```python", "from peft import PeftModel", f"from transformers import {auto}, AutoTokenizer", ""]
    if is_qwen3 and kind == "qa":
        lines += [
            "# Qwen3ForQuestionAnswering keeps its backbone under `transformer.`, the checkpoint under `model.`:",
            "# without key_mapping, from_pretrained loads NO backbone weights (it only warns).",
            f"base = {auto}.from_pretrained({base!r}{rev}, key_mapping={{r\"^model\\.\": \"transformer.\"}})",
        ]
    else:
        lines.append(f"base = {auto}.from_pretrained({base!r}{rev}{labels})")
    lines.append(f"tokenizer = AutoTokenizer.from_pretrained({base!r}{rev})")
    if is_qwen3 and kind != "qa":
        lines += [
            "# Qwen3 checkpoints have no pad_token_id; classification pools at the last non-pad token.",
            "if tokenizer.pad_token is None:",
            "    tokenizer.pad_token = tokenizer.eos_token",
            "base.config.pad_token_id = tokenizer.pad_token_id",
        ]
    lines += ['model = PeftModel.from_pretrained(base, "path/to/adapter")', "model.eval()", "```"]
    return "\n".join(lines)


def model_card(config: Any, ranks: Mapping[str, int], metrics: Mapping[str, Any], step: int,
               model_type: str = "") -> str:
    """The README.md text of an adapter exported from a run with ``config`` at ``step``."""
    from adapad_jax.validation import task_spec_for

    spec = task_spec_for(config)
    base = str(config.model.name_or_path)
    revision = str(config.model.get("revision", "") or "")
    adapter = config.adapter
    method = str(adapter.method)
    budget = (
        f"fixed rank {adapter.lora_rank} per module" if method == "lora"
        else f"global rank budget {adapter.rank_budget}, at most {adapter.r_max} per module"
    )
    metric_lines = [f"| {k} | {v:.4f} |" for k, v in metrics.items() if isinstance(v, (int, float))]
    front = ["---", "library_name: peft", f"base_model: {base}", "tags:", "- lora", f"- {method}", "- adapad_jax",
             "---", ""]
    body = [
        f"# {method} adapter for {base} on {spec.name}",
        "",
        f"- **base model**: `{base}`" + (f" (revision `{revision}`)" if revision else ""),
        f"- **task**: `{spec.name}` ({spec.kind}, {spec.num_labels} output{'s' if spec.num_labels != 1 else ''})",
        f"- **method**: {_METHODS.get(method, method)}",
        f"- **budget**: {budget}; alpha {adapter.alpha}",
        f"- **checkpoint**: step {step}",
        "",
        "## Ranks",
        "",
        *_rank_summary(ranks),
        "",
        "Per-module ranks are in `rank_pattern` of `adapter_config.json` (and `ranks.json` beside this folder).",
        "",
        "## Metrics",
        "",
        *(["| metric | value |", "|---|---|", *metric_lines] if metric_lines else ["No evaluation at this step."]),
        "",
        "## Loading with PEFT",
        "",
        _loading_snippet(base, revision, spec.kind, spec.num_labels, model_type == "qwen3"),
        "",
        "Trained with [adapad_jax](https://arxiv.org/abs/2605.10741) (JAX/Flax); the adapter is a standard PEFT "
        "LoRA adapter with per-module ranks.",
        "",
    ]
    return "\n".join(front + body)


def write_model_card(
    adapter_dir: str | os.PathLike, config: Any, metrics: Mapping[str, Any], step: int, model_type: str = ""
) -> Path:
    """Write ``README.md`` into an exported ``adapter/`` (ranks from ``ranks.json`` beside it, else its config)."""
    from adapad_jax.output_set import write_text_atomic

    adapter_dir = Path(adapter_dir)
    ranks_file = adapter_dir.parent / "ranks.json"
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if ranks_file.is_file():
        ranks = json.loads(ranks_file.read_text())
    else:
        ranks = {k.replace("\\", ""): int(v) for k, v in adapter_config.get("rank_pattern", {}).items()}
    path = adapter_dir / "README.md"
    write_text_atomic(path, model_card(config, ranks, metrics, step, model_type))
    return path
