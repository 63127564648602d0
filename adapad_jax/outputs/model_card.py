"""Model cards (``adapter/README.md``, ``merged/README.md``): what was exported, how it was trained, how to load it.

Written with ``huggingface_hub``'s ``ModelCard`` / ``ModelCardData``: the metadata block (base_model, datasets,
license, pipeline_tag, library_name, tags and a model-index with the run's metrics) is what the hub reads.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Mapping

from adapad_jax.outputs.rank_outputs import layer_and_type

# transformers Auto class per task kind, for the loading snippet.
_AUTO_CLASSES = {
    "classification": "AutoModelForSequenceClassification",
    "regression": "AutoModelForSequenceClassification",
    "qa": "AutoModelForQuestionAnswering",
}
_PIPELINE_TAGS = {"classification": "text-classification", "regression": "text-classification",
                  "qa": "question-answering"}
_METHODS = {
    "adapad": "AdaPaD (adaptive parallel deflation: rank-1 slots trained in parallel against deflation targets, "
              "ranks discovered by importance x uncertainty)",
    "joint": "joint adaptive-rank baseline (same allocator, all slots trained together, IncreLoRA-style)",
    "lora": "fixed-rank LoRA baseline",
    "adalora": "AdaLoRA (Zhang et al. 2023b): SVD-form triplets pruned to the budget by sensitivity x uncertainty",
    "increlora": "IncreLoRA (Zhang et al. 2023a): ranks added by importance until the budget",
    "sora": "SoRA (Ding et al. 2023): gated ranks sparsified by an L1 term and a proximal gate step",
    "ardlora": "ARD-LoRA (Shinwari and Usama 2025): a learnable per-module rank scale",
}


def metrics_at_step(run_dir: str | os.PathLike, step: int) -> dict[str, float]:
    """The evaluation metrics a run logged at ``step`` (eval_results.json, else metrics.jsonl); {} if none."""
    from adapad_jax.outputs.layout import EVAL_RESULTS_FILE, METRICS_FILE

    run_dir = Path(run_dir)
    results = run_dir / EVAL_RESULTS_FILE
    if results.is_file():
        saved = json.loads(results.read_text())
        if saved.get("step") == step and isinstance(saved.get("metrics"), dict):
            return saved["metrics"]
    found: dict[str, float] = {}
    log = run_dir / METRICS_FILE
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


def _loading_snippet(base: str, revision: str, spec: Any, is_qwen3: bool) -> str:
    kind = spec.kind
    auto = _AUTO_CLASSES[kind]
    rev = f", revision={revision!r}" if revision else ""
    if kind == "classification" and spec.label_names:
        labels = f", id2label={dict(enumerate(spec.label_names))!r}"
    else:
        labels = f", num_labels={spec.num_labels}" if kind != "qa" else ""
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


def _merged_snippet(spec: Any) -> str:
    tag = _PIPELINE_TAGS[spec.kind]
    return "\n".join(["```python", "from transformers import pipeline", "",
                      f'model = pipeline("{tag}", model="path/to/merged")', "```"])


def budget_line(config: Any, num_modules: int, reachable_budget: int | None) -> str:
    """The budget as configured and, when ``num_modules`` x r_max cannot hold it, the total rank actually reachable.

    ``reachable_budget``: the most total rank the run can commit (the allocator's ``rank_capacity``, handed in by
    the run); None: not stated.
    """
    adapter = config.adapter
    if str(adapter.method) == "lora":
        return f"fixed rank {adapter.lora_rank} per module"
    budget, r_max = int(adapter.rank_budget), int(adapter.r_max)
    reachable = budget if reachable_budget is None else int(reachable_budget)
    if reachable < budget:
        return (f"global rank budget {budget}, of which {reachable} is reachable ({num_modules} modules x r_max "
                f"{r_max}: no module grows past r_max), at most {r_max} per module")
    return f"global rank budget {budget}, at most {r_max} per module"


def base_license(base_dir: str | os.PathLike | None) -> str | None:
    """The license the base checkpoint's own model card states (``<base_dir>/README.md``), or None."""
    from huggingface_hub import ModelCard

    card = Path(base_dir) / "README.md" if base_dir else None
    if card is None or not card.is_file():
        return None
    try:
        return ModelCard.load(card).data.license
    except Exception:  # noqa: BLE001 - a base card we cannot parse only means no license to inherit
        return None


def _eval_results(spec: Any, metrics: Mapping[str, Any]) -> list[Any]:
    """model-index entries, one per numeric metric; ``metric_name`` is the key in eval_results.json."""
    from huggingface_hub import EvalResult

    dataset, config_name = spec.hub_names[0] if spec.hub_names else ("local", None)
    results = []
    for key, value in metrics.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        split, _, name = key.rpartition("/")
        results.append(EvalResult(
            task_type=_PIPELINE_TAGS[spec.kind], dataset_type=dataset, dataset_name=spec.name,
            dataset_config=config_name, dataset_split=split or spec.validation_splits[0],
            metric_type=name, metric_name=key, metric_value=float(value),
        ))
    return results


def card_data(config: Any, spec: Any, metrics: Mapping[str, Any], library_name: str, tags: list[str],
              license: str | None = None) -> Any:
    """The card's metadata (``huggingface_hub.ModelCardData``), with the run's metrics as its model-index."""
    from huggingface_hub import ModelCardData

    base = str(config.model.name_or_path)
    results = _eval_results(spec, metrics)
    return ModelCardData(
        base_model=base, datasets=[spec.hub_names[0][0]] if spec.hub_names else None, license=license,
        pipeline_tag=_PIPELINE_TAGS[spec.kind], library_name=library_name,
        tags=[*tags, str(config.adapter.method), "adapad_jax"],
        model_name=f"{Path(base).name}-{spec.name}-{config.adapter.method}" if results else None,
        eval_results=results or None,
    )


def _facts(config: Any, spec: Any, step: int, num_modules: int, reachable_budget: int | None) -> list[str]:
    base = str(config.model.name_or_path)
    revision = str(config.model.get("revision", "") or "")
    method = str(config.adapter.method)
    labels = f": {', '.join(spec.label_names)}" if spec.kind == "classification" and spec.label_names else ""
    return [
        f"- **base model**: `{base}`" + (f" (revision `{revision}`)" if revision else ""),
        f"- **task**: `{spec.name}` ({spec.kind}, {spec.num_labels} output{'s' if spec.num_labels != 1 else ''}"
        f"{labels})",
        f"- **method**: {_METHODS.get(method, method)}",
        f"- **budget**: {budget_line(config, num_modules, reachable_budget)}; alpha {config.adapter.alpha}",
        f"- **checkpoint**: step {step}",
    ]


def _metric_table(metrics: Mapping[str, Any]) -> list[str]:
    rows = [f"| {k} | {v:.4f} |" for k, v in metrics.items() if isinstance(v, (int, float))]
    return ["| metric | value |", "|---|---|", *rows] if rows else ["No evaluation at this step."]


def parameter_lines(config: Any, accounting: Mapping[str, Any] | None) -> list[str]:
    """Markdown lines of the run's adapter parameter counts (``Trainer.accounting``); none without them."""
    if not accounting:
        return []
    budget = int(accounting.get("param_budget", 0))
    lines = [
        "## Adapter parameters",
        "",
        "| count | parameters |",
        "|---|---|",
        f"| factors (committed rank x (in + out)) | {accounting['factors']:,} |",
        f"| with the method's per-rank extras | {accounting['with_extras']:,} |",
        f"| with reserves (every row that trains) | {accounting['with_reserves']:,} |",
        f"| task head (not in the above) | {accounting['head']:,} |",
        f"| {config.adapter.method}'s paper count ({accounting['paper_count']}) | {accounting['paper']:,} |",
        "",
    ]
    if budget > 0:
        into = ", ".join(f"`{k}={v}`" for k, v in (accounting.get("converted_to") or {}).items())
        lines += [f"Budget given in parameters: `adapter.param_budget={budget}`" + (f", run as {into}" if into else "")
                  + ".", ""]
    return lines


def model_card(config: Any, ranks: Mapping[str, int], metrics: Mapping[str, Any], step: int,
               model_type: str = "", license: str | None = None, accounting: Mapping[str, Any] | None = None, *,
               reachable_budget: int | None) -> Any:
    """The ``huggingface_hub.ModelCard`` of an adapter exported from a run with ``config`` at ``step``
    (``reachable_budget``: see ``budget_line``; ``accounting``: the run's parameter counts)."""
    from huggingface_hub import ModelCard

    from adapad_jax.config.validation import task_spec_for

    spec = task_spec_for(config)
    base = str(config.model.name_or_path)
    revision = str(config.model.get("revision", "") or "")
    data = card_data(config, spec, metrics, "peft", ["lora"], license)
    converted = (accounting or {}).get("converted_to") or {}
    if converted:  # the budget line states the rank budget adapter.param_budget set
        config = copy.deepcopy(config)
        for dotted, value in converted.items():
            config.adapter[dotted.rpartition(".")[2]] = value
    body = [
        f"# {config.adapter.method} adapter for {base} on {spec.name}",
        "",
        *_facts(config, spec, step, len(ranks), reachable_budget),
        "",
        "## Ranks",
        "",
        *_rank_summary(ranks),
        "",
        "Per-module ranks are in `rank_pattern` of `adapter_config.json` (and `ranks.json` beside this folder).",
        "",
        *parameter_lines(config, accounting),
        "## Metrics",
        "",
        *_metric_table(metrics),
        "",
        "## Loading with PEFT",
        "",
        _loading_snippet(base, revision, spec, model_type == "qwen3"),
        "",
        "Trained with [adapad_jax](https://arxiv.org/abs/2605.10741) (JAX/Flax); the adapter is a standard PEFT "
        "LoRA adapter with per-module ranks.",
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def merged_model_card(config: Any, ranks: Mapping[str, int], metrics: Mapping[str, Any], step: int,
                      dtype: str, license: str | None = None, *, reachable_budget: int | None) -> Any:
    """The ``huggingface_hub.ModelCard`` of a merged checkpoint (adapters folded into the weights)."""
    from huggingface_hub import ModelCard

    from adapad_jax.config.validation import task_spec_for

    spec = task_spec_for(config)
    data = card_data(config, spec, metrics, "transformers", ["lora", "merged"], license)
    body = [
        f"# {spec.name} model: {config.adapter.method} adapters merged into {config.model.name_or_path}",
        "",
        *_facts(config, spec, step, len(ranks), reachable_budget),
        f"- **weights**: {dtype}, every adapter merged (W0 + s B A), task head included; loads in plain "
        "transformers, no PEFT needed",
        "",
        "## Ranks",
        "",
        *_rank_summary(ranks),
        "",
        "## Metrics",
        "",
        *_metric_table(metrics),
        "",
        "## Loading",
        "",
        _merged_snippet(spec),
        "",
        "Trained with [adapad_jax](https://arxiv.org/abs/2605.10741) (JAX/Flax).",
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def _exported_ranks(adapter_dir: Path) -> dict[str, int]:
    """Per-module ranks of an export: ``ranks.json`` beside ``adapter/``, else the adapter's rank_pattern."""
    ranks_file = adapter_dir.parent / "ranks.json"
    if ranks_file.is_file():
        return json.loads(ranks_file.read_text())
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    return {k.replace("\\", ""): int(v) for k, v in adapter_config.get("rank_pattern", {}).items()}


def write_model_card(
    adapter_dir: str | os.PathLike, config: Any, metrics: Mapping[str, Any], step: int, model_type: str = "",
    base_dir: str | os.PathLike | None = None, accounting: Mapping[str, Any] | None = None, *,
    reachable_budget: int | None,
) -> Path:
    """Write ``README.md`` into an exported ``adapter/``; ``base_dir``: the base checkpoint (its card's license);
    ``accounting``: the run's parameter counts (``Trainer.accounting``); ``reachable_budget``: see ``budget_line``."""
    from adapad_jax.outputs.output_set import write_text_atomic

    adapter_dir = Path(adapter_dir)
    card = model_card(config, _exported_ranks(adapter_dir), metrics, step, model_type, base_license(base_dir),
                      accounting, reachable_budget=reachable_budget)
    path = adapter_dir / "README.md"
    write_text_atomic(path, str(card))
    return path


def write_merged_model_card(
    merged_dir: str | os.PathLike, ranks: Mapping[str, int], config: Any, metrics: Mapping[str, Any], step: int,
    dtype: str, base_dir: str | os.PathLike | None = None, *, reachable_budget: int | None,
) -> Path:
    """Write ``README.md`` into an exported ``merged/`` checkpoint."""
    from adapad_jax.outputs.output_set import write_text_atomic

    path = Path(merged_dir) / "README.md"
    card = merged_model_card(config, ranks, metrics, step, dtype, base_license(base_dir),
                             reachable_budget=reachable_budget)
    write_text_atomic(path, str(card))
    return path
