"""The offline demo: a planted-rank teacher task on a small random DeBERTaV3 backbone.

``python launch/train.py --config configs/demo.py`` builds, once (cached under ``demo.assets_dir``):

1. a SentencePiece tokenizer trained on synthetic sentences (``adapad_jax.testing.tiny``);
2. a random DeBERTaV3-architecture backbone (hidden 64, 2 layers) written as a transformers checkpoint;
3. a teacher = backbone + planted adapter deltas ``sum_k sigma_k u_k v_k^T`` of different ranks in a few
   modules (rank 0 elsewhere), applied through the same ``lora`` collection the trainer uses;
4. a classification head that reads the direction of the pooled features the planted deltas move most
   relative to how much the backbone alone moves it (a generalised eigenvector), thresholded at the median:
   the backbone alone predicts these labels at about chance, so everything learnable is in the deltas;
5. train/validation files (``sentence``, ``label``, ``idx``) labelled by the teacher.

AdaPaD then trains on it like any GLUE task. The report (``report``) leads with the comparison a researcher
wants: on the planted benchmark's ``branches`` task (a toy model where each planted delta can only be learnt by
its own module, so allocation matters), AdaPaD, fixed-rank LoRA and ``demo.other_methods`` (default sora) at
the same budget, each trained to a plateau: held-out error and planted-vs-found ranks, a table and
``comparison_branches.png`` (also ``comparison_branches.json``). Then the DeBERTa-architecture run as the
end-to-end pipeline check (tokenizer, model, PEFT export): accuracy against the backbone alone and a
planted-vs-found rank table with its agreement (``planted_vs_found.json``, ``planted_vs_found.png``). In a
transformer every module's output reaches the head through the residual stream, so other modules can stand in
for a planted one and the found ranks need not follow the planted ones there (docs/RESULTS.md, the planted
benchmark's ``residual`` task); that is why the comparison runs on the branches task.

Over 400 lines because the demo's assets, its teacher construction and its report belong to one command.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import ml_collections
import numpy as np

from adapad_jax.data.tasks import TaskSpec
from adapad_jax.data.task_hooks import TaskHooks

# Several classes, so the labels see several output directions of the deltas: with one readout direction
# (a binary label), a rank-r delta acts on the label only through one linear functional, to first order,
# and every rank above 1 is invisible to the task.
DEMO_CLASSES = 6
DEMO_TASK = TaskSpec(
    name="demo",
    kind="classification",
    hub_names=(),
    text_columns=("sentence",),
    num_labels=DEMO_CLASSES,
    metric_names=("accuracy",),
    label_names=tuple(f"class{c}" for c in range(DEMO_CLASSES)),
)
PLACEHOLDER_MODEL = "demo-backbone"
BACKBONE_DIR = "backbone"
PLANTED_FILE = "planted.json"
PICTURE_FILE = "planted_vs_found.png"
AGREEMENT_FILE = "planted_vs_found.json"
COMPARISON_FILE = "comparison_branches.json"
COMPARISON_PICTURE = "comparison_branches.png"
_ASSET_VERSION = 2  # bump when the asset recipe changes, so stale caches are rebuilt


def demo_settings() -> ml_collections.ConfigDict:
    """The ``demo`` section of configs/demo.py: backbone size, planted ranks and data sizes."""
    demo = ml_collections.ConfigDict()
    demo.assets_dir = ""  # "" = ~/.cache/adapad_jax/demo (or $ADAPAD_DEMO_CACHE)
    demo.hidden_size = 64
    demo.num_layers = 2
    demo.num_heads = 4
    demo.intermediate_size = 128
    demo.initializer_range = 0.1
    demo.vocab_size = 400
    # Comma-separated "<module path inside deberta.encoder>:<rank>"; modules not listed get rank 0.
    # A value_proj delta equals an attention.output.dense delta of the same layer (D_o = W_v^-1 D_v W_o,
    # attention mixes tokens linearly), so the planted modules avoid that pair: intermediate.dense and
    # output.dense sit on either side of the GELU and have no such twin.
    demo.planted = "layer.1.intermediate.dense:4,layer.0.intermediate.dense:3,layer.1.output.dense:2"
    demo.planted_scale = 1.5  # top planted singular value / spectral norm of the module's weight
    demo.planted_decay = 0.8  # sigma_k = scale * ||W0|| * decay**k
    demo.num_train = 2048
    demo.num_validation = 512
    demo.min_words = 6
    demo.max_words = 18
    demo.max_length = 48  # tokens, as data.max_length of the run
    demo.logit_scale = 4.0  # std of the teacher's logit margin
    demo.seed = 0
    # The comparison the demo leads with, on the planted benchmark's branches task (launch/planted.py; a toy model
    # where each planted delta can only be learnt by its own module): AdaPaD, fixed-rank LoRA and other_methods at
    # the same budget, each trained to a plateau (at most branches_max_steps); held-out error and planted vs found.
    demo.branches_check = True
    demo.branches_max_steps = 2000
    # Other adaptive methods in the comparison (comma-separated adapter.method names; "" = none): the one to beat.
    # sora: the best published adaptive method on this task in docs/RESULTS.md (AdaLoRA, IncreLoRA, ARD-LoRA trail).
    demo.other_methods = "sora"
    return demo


def parse_planted(text: str) -> dict[str, int]:
    """``"layer.1.attention.self.value_proj:4,..."`` -> ``{"deberta.encoder.layer.1.attention.self.value_proj": 4}``."""
    planted: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        path, _, rank = item.rpartition(":")
        if not path or not rank.isdigit() or int(rank) < 1:
            raise ValueError(f"demo.planted entry '{item}' must look like 'layer.0.intermediate.dense:3' (rank >= 1)")
        full = path if path.startswith("deberta.") else f"deberta.encoder.{path}"
        planted[full] = int(rank)
    if not planted:
        raise ValueError("demo.planted is empty: plant at least one module")
    return planted


def assets_root(demo: ml_collections.ConfigDict) -> Path:
    """Cache directory of the demo assets for these settings (a hash of them names the subdirectory)."""
    base = demo.assets_dir or os.environ.get("ADAPAD_DEMO_CACHE") or os.path.join("~", ".cache", "adapad_jax", "demo")
    settings = {k: v for k, v in demo.to_dict().items() if k != "assets_dir" and not k.startswith("branches_")}
    digest = hashlib.sha256(json.dumps([_ASSET_VERSION, settings], sort_keys=True).encode()).hexdigest()[:12]
    return Path(os.path.expanduser(base)) / digest


# ------------------------------------------------------------------------------------------- synthetic text


def _word_pool() -> list[str]:
    from adapad_jax.testing import tiny

    words = list(tiny.NAMES + tiny.NOUNS + tiny.POSITIVE + tiny.NEGATIVE + tiny.VERBS)
    for values in tiny.ATTRIBUTES.values():
        words += list(values)
    return words + ["the", "a", "of", "near", "was", "and", "but"]


def synthetic_sentences(count: int, min_words: int, max_words: int, rng: np.random.Generator) -> list[str]:
    """Random word sequences over the tiny datasets' vocabulary (the tokenizer covers every word)."""
    words = _word_pool()
    lengths = rng.integers(min_words, max_words + 1, size=count)
    return [" ".join(words[i] for i in rng.integers(len(words), size=n)) + "." for n in lengths]


# ------------------------------------------------------------------------------------------- teacher


def planted_lora(model: Any, planted: Mapping[str, int], scale: float, decay: float, seed: int) -> dict[str, Any]:
    """The teacher's ``lora`` collection: random orthonormal rank-r deltas with sigma_k = scale ||W0||_2 decay^k."""
    from flax import traverse_util

    by_path = {t.hf_path: t for t in model.targets}
    unknown = sorted(set(planted) - set(by_path))
    if unknown:
        raise ValueError(f"demo.planted names modules that are not adapter targets: {unknown}")
    rng = np.random.default_rng(seed)
    flat_params = traverse_util.flatten_dict(model.params)
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for path, rank in planted.items():
        target = by_path[path]
        kernel = np.asarray(flat_params[target.flax_path + ("kernel",)], dtype=np.float64)
        norm = np.linalg.norm(kernel, 2)
        u, _ = np.linalg.qr(rng.standard_normal((target.in_features, rank)))
        v, _ = np.linalg.qr(rng.standard_normal((target.out_features, rank)))
        flat[target.flax_path + ("a",)] = u.T.astype(np.float32)
        flat[target.flax_path + ("b",)] = v.T.astype(np.float32)
        flat[target.flax_path + ("coef",)] = (scale * norm * decay ** np.arange(rank)).astype(np.float32)
    return traverse_util.unflatten_dict(flat)


def pooled_features(model: Any, params: Any, lora: Any, input_ids: np.ndarray, attention_mask: np.ndarray,
                    batch_size: int = 256) -> np.ndarray:
    """The classification head's input (pooler output) for every row, with the given adapter deltas."""
    import jax

    @jax.jit
    def forward(ids, mask):
        variables = {"params": params, **({"lora": lora} if lora else {})}
        _, state = model.module.apply(
            variables, input_ids=ids, attention_mask=mask, deterministic=True,
            capture_intermediates=lambda module, method: module.name == "pooler",
        )
        return state["intermediates"]["pooler"]["__call__"][0]

    out = [np.asarray(forward(input_ids[i:i + batch_size], attention_mask[i:i + batch_size]))
           for i in range(0, len(input_ids), batch_size)]
    return np.concatenate(out).astype(np.float64)


def readout_directions(base: np.ndarray, teacher: np.ndarray, count: int) -> np.ndarray:
    """[H, count] unit columns: the top generalised eigenvectors of Var(w.(teacher - base)) / Var(w.base)."""
    import scipy.linalg

    moved = np.cov((teacher - base).T)
    still = np.cov(base.T)
    still = still + 1e-6 * np.trace(still) / len(still) * np.eye(len(still))
    _, vectors = scipy.linalg.eigh(moved, still)
    top = vectors[:, ::-1][:, :count]
    return top / np.linalg.norm(top, axis=0, keepdims=True)


# ------------------------------------------------------------------------------------------- assets


def build_assets(demo: ml_collections.ConfigDict, directory: Path, log: Callable[[str], None] = print) -> dict:
    """Write tokenizer + backbone checkpoint + teacher-labelled data into ``directory``; returns planted.json."""
    import jax
    from flax import traverse_util
    from safetensors.numpy import save_file

    from adapad_jax.models.registry import model_from_config
    from adapad_jax.testing import tiny

    planted = parse_planted(demo.planted)
    rng = np.random.default_rng(demo.seed)
    backbone = directory / BACKBONE_DIR
    sentences = synthetic_sentences(demo.num_train + demo.num_validation, demo.min_words, demo.max_words, rng)
    tokenizer = tiny.train_sentencepiece_tokenizer(backbone, tiny.tiny_corpus() + sentences[:200], demo.vocab_size)
    hf_config = tiny.tiny_deberta_config(
        vocab_size=max(len(tokenizer), demo.vocab_size),
        hidden_size=demo.hidden_size,
        num_hidden_layers=demo.num_layers,
        num_attention_heads=demo.num_heads,
        intermediate_size=demo.intermediate_size,
        position_buckets=32,
        initializer_range=demo.initializer_range,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=DEMO_CLASSES,
    )
    model = model_from_config(hf_config, task="classification", num_labels=DEMO_CLASSES, seed=int(demo.seed))
    params = jax.tree.map(np.asarray, model.params)

    max_length = int(demo.max_length)
    encoded = tokenizer(sentences, truncation=True, max_length=max_length, padding="max_length")
    ids = np.asarray(encoded["input_ids"], np.int32)
    mask = np.asarray(encoded["attention_mask"], np.int32)
    lora = planted_lora(model, planted, demo.planted_scale, demo.planted_decay, int(demo.seed) + 1)
    base = pooled_features(model, params, None, ids, mask)
    teacher = pooled_features(model, params, lora, ids, mask)
    readout = readout_directions(base, teacher, DEMO_CLASSES)
    margin_teacher, margin_base = teacher @ readout, base @ readout
    # Logit c = gain_c * (w_c . pooled - centre_c): each readout standardised on the teacher's train rows,
    # so the argmax labels are roughly balanced.
    centre = margin_teacher[: demo.num_train].mean(0)
    gain = demo.logit_scale / np.maximum(margin_teacher[: demo.num_train].std(0), 1e-12)
    labels = np.argmax((margin_teacher - centre) * gain, axis=-1)
    backbone_labels = np.argmax((margin_base - centre) * gain, axis=-1)
    flat = traverse_util.flatten_dict(params)
    flat[("classifier", "kernel")] = (readout * gain).astype(np.float32)
    flat[("classifier", "bias")] = (-gain * centre).astype(np.float32)
    params = traverse_util.unflatten_dict(flat)

    # Labels straight from the teacher's logits with the final head, as a check of the construction.
    teacher_logits = np.concatenate([
        np.asarray(model.module.apply({"params": params, "lora": lora}, input_ids=ids[i:i + 256],
                                      attention_mask=mask[i:i + 256], deterministic=True)["logits"])
        for i in range(0, len(ids), 256)
    ])
    agree = float(np.mean(teacher_logits.argmax(-1) == labels))
    if agree < 0.99:
        raise AssertionError(f"demo teacher construction: logits agree with the labels on only {agree:.3f}")

    hf_config.architectures = [model.hf_architecture]
    hf_config.save_pretrained(str(backbone))
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in model.to_hf_state_dict(params).items()},
              str(backbone / "model.safetensors"), metadata={"format": "pt"})

    n_train = demo.num_train
    split_rows = {
        "train.jsonl": [(s, int(y), i) for i, (s, y) in enumerate(zip(sentences[:n_train], labels[:n_train]))],
        "validation.jsonl": [(s, int(y), i) for i, (s, y) in enumerate(zip(sentences[n_train:], labels[n_train:]))],
    }
    for name, rows in split_rows.items():
        with (directory / name).open("w") as f:
            for sentence, label, idx in rows:
                f.write(json.dumps({"sentence": sentence, "label": label, "idx": idx}) + "\n")
    val = slice(n_train, None)
    info = {
        "planted": planted,
        "modules": [t.hf_path for t in model.targets],
        "class_frequency_validation": np.bincount(labels[val], minlength=DEMO_CLASSES).tolist(),
        "backbone_only_accuracy": float(np.mean(backbone_labels[val] == labels[val])),
        "teacher_accuracy": float(np.mean(teacher_logits[val].argmax(-1) == labels[val])),
        "max_length": max_length,
    }
    (directory / PLANTED_FILE).write_text(json.dumps(info, indent=2) + "\n")
    log(f"demo assets built in {directory}: backbone accuracy alone {info['backbone_only_accuracy']:.3f}")
    return info


def ensure_assets(demo: ml_collections.ConfigDict, log: Callable[[str], None] = print) -> Path:
    """Build the assets once (into a temp dir renamed into place) and return their directory."""
    root = assets_root(demo)
    if (root / PLANTED_FILE).is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}-"))
    try:
        log(f"building the demo backbone, tokenizer and teacher-labelled data (once) in {root}")
        build_assets(demo, staging, log)
        try:
            os.replace(staging, root)
        except OSError:  # another process finished first
            if not (root / PLANTED_FILE).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def prepare_config(config: ml_collections.ConfigDict, log: Callable[[str], None] = print) -> Path:
    """Build or reuse the demo assets and point the config's model and data fields at them."""
    from adapad_jax.config.schema import ConfigError

    if not isinstance(config.demo.branches_max_steps, int) or config.demo.branches_max_steps < 1:
        raise ConfigError(f"demo.branches_max_steps={config.demo.branches_max_steps!r} must be an int >= 1")
    if config.demo.branches_check:
        check_comparison_methods(comparison_methods(config.demo))
    root = ensure_assets(config.demo, log)
    if config.model.name_or_path in ("", PLACEHOLDER_MODEL):
        config.model.name_or_path = str(root / BACKBONE_DIR)
    if not config.data.train_file and not config.data.validation_file:
        config.data.train_file = str(root / "train.jsonl")
        config.data.validation_file = str(root / "validation.jsonl")
    return root


# ------------------------------------------------------------------------------------------- report


def rank_table(planted: Mapping[str, int], found: Mapping[str, int]) -> str:
    """Text table: module, planted rank, found rank (modules in the order of ``found``)."""
    width = max(len(p) for p in found)
    lines = [f"{'module':<{width}}  planted  found", "-" * (width + 16)]
    for path, rank in found.items():
        lines.append(f"{path:<{width}}  {planted.get(path, 0):>7}  {rank:>5}")
    lines.append(f"{'total':<{width}}  {sum(planted.values()):>7}  {sum(found.values()):>5}")
    return "\n".join(lines)


def plot_planted_vs_found(path: str | os.PathLike, planted: Mapping[str, int], found: Mapping[str, int]) -> None:
    """Two heatmaps (layers x module types), planted ranks left, ranks found by training right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from adapad_jax.outputs.rank_outputs import rank_grid

    found_grid, layers, types = rank_grid(found)
    planted_grid, _, _ = rank_grid({p: planted.get(p, 0) for p in found})
    top = max(np.nanmax(found_grid), np.nanmax(planted_grid), 1)
    fig, axes = plt.subplots(1, 2, figsize=(2.5 + 1.6 * len(types), 1.6 + 0.5 * len(layers)))
    for ax, grid, title in ((axes[0], planted_grid, "planted rank (teacher)"), (axes[1], found_grid, "rank found by AdaPaD")):
        image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=top, aspect="auto")
        ax.set_xticks(range(len(types)), types, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(layers)), [f"layer {layer}" for layer in layers], fontsize=8)
        ax.set_title(title, fontsize=10)
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                ax.text(j, i, f"{int(grid[i, j])}", ha="center", va="center", color="w", fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def agreement(planted: Mapping[str, int], found: Mapping[str, int], budget: int, r_max: int) -> dict[str, Any]:
    """Planted-vs-found agreement over the modules of ``found``: the rank-recovery measures of the planted
    benchmark (share of the rank on planted modules, share of the rank grown above the minimum, Spearman),
    the most the budget allows on planted modules, and the per-module table."""
    from adapad_jax.studies.planted import best_planted_fraction, rank_recovery

    modules = list(found)
    planted_list = [int(planted.get(m, 0)) for m in modules]
    found_list = [int(found[m]) for m in modules]
    return {
        **rank_recovery(planted_list, found_list),
        "best_planted_fraction": best_planted_fraction(planted_list, budget, r_max),
        "total_planted": sum(planted_list), "total_found": sum(found_list),
        "modules": [{"module": m, "planted": p, "found": f} for m, p, f in zip(modules, planted_list, found_list)],
    }


def agreement_line(measures: Mapping[str, Any]) -> str:
    """One line with the agreement measures (``—`` where a measure is undefined)."""

    def show(value: float) -> str:
        return "—" if value is None or value != value else f"{value:.2f}"

    return (f"planted vs found: {show(measures['planted_fraction'])} of the rank on planted modules "
            f"(at most {show(measures['best_planted_fraction'])} with this budget), "
            f"{show(measures['extra_on_planted'])} of the rank grown above the minimum, "
            f"Spearman {show(measures['spearman'])}")


def comparison_methods(demo: ml_collections.ConfigDict) -> list[str]:
    """The methods of the branches comparison: adapad, lora, then ``demo.other_methods`` in their order."""
    others = [m.strip() for m in str(demo.other_methods).split(",") if m.strip()]
    return ["adapad", "lora"] + [m for m in dict.fromkeys(others) if m not in ("adapad", "lora")]


def check_comparison_methods(methods: list[str]) -> None:
    """Every method of the comparison is an ``adapter.method`` that can start on the branches task (one line
    naming ``demo.other_methods`` otherwise), before any compute."""
    from adapad_jax.config.schema import METHODS, ConfigError
    from adapad_jax.methods.registry import build_method
    from adapad_jax.studies import planted as study
    from adapad_jax.testing.toy import make_toy_model
    from adapad_jax.training.settings import TrainerSettings

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"demo.other_methods: unknown method {unknown[0]!r}; choose among {list(METHODS)}")
    task = study.PlantedTask("branches", study.BRANCHES_PLANTED)
    model = make_toy_model(hidden=task.hidden, num_layers=task.num_layers, vocab_size=task.vocab_size,
                           num_outputs=task.hidden, layout=task.layout)
    for method in methods:
        config = study.study_config(study.STUDY_ADAPTER, study.STUDY_OPTIM, method, 0, 2000, len(model.targets))
        try:
            build_method(TrainerSettings.from_config(config), model.targets)
        except ConfigError as err:
            raise ConfigError(f"demo.other_methods: {method} cannot run: {err}") from None


def comparison_table(planted: list[int], records: Mapping[str, Mapping[str, Any]]) -> str:
    """Text table: per module its planted rank and each method's found rank, the totals, then per method the
    held-out error, the share of the rank on planted modules and the Spearman correlation."""
    methods = list(records)
    width = max(12, *(len(m) for m in methods))
    head = f"{'':<34}{'planted':>9}" + "".join(f"{m:>{width}}" for m in methods)

    def number(value: Any, digits: int) -> str:
        return "—" if value is None or value != value else f"{value:.{digits}f}"

    lines = [head, "-" * len(head)]
    modules = list(next(iter(records.values()))["ranks"])
    for m, module in enumerate(modules):
        lines.append(f"{module:<34}{planted[m]:>9}" + "".join(f"{records[k]['ranks'][module]:>{width}}"
                                                              for k in methods))
    lines.append(f"{'total rank':<34}{sum(planted):>9}" + "".join(f"{sum(records[k]['ranks'].values()):>{width}}"
                                                                  for k in methods))
    for label, key, digits in (("held-out error (backbone = 1)", "error", 4),
                               ("share of the rank on planted", "planted_fraction", 2),
                               ("Spearman planted vs found", "spearman", 2)):
        lines.append(f"{label:<34}{'':>9}" + "".join(f"{number(records[k][key], digits):>{width}}" for k in methods))
    lines.append(f"{'steps (stopped at a plateau)':<34}{'':>9}" + "".join(f"{records[k]['steps']:>{width}}"
                                                                          for k in methods))
    return "\n".join(lines)


def plot_comparison(path: str | os.PathLike, planted: list[int], records: Mapping[str, Mapping[str, Any]]) -> None:
    """Left: held-out error per method (log scale). Right: per module, the planted rank (black outline) and each
    method's found rank (bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(records)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [1, 2.4]})
    errors = [max(records[m]["error"], 1e-6) for m in methods]
    left.bar(range(len(methods)), errors, color=[f"C{i}" for i in range(len(methods))])
    left.set_yscale("log")
    left.set_xticks(range(len(methods)), methods)
    left.set_ylabel("held-out error (backbone = 1)")
    left.set_title("error at the same budget", fontsize=10)
    width = 0.8 / len(methods)
    modules = np.arange(len(planted))
    for i, method in enumerate(methods):
        right.bar(modules - 0.4 + width * (i + 0.5), list(records[method]["ranks"].values()), width,
                  color=f"C{i}", label=method)
    right.bar(modules, planted, 0.85, fill=False, edgecolor="black", linewidth=1.5, label="planted")
    top = max(max(planted), *(max(records[m]["ranks"].values()) for m in methods))
    right.set_ylim(0, top * 1.3)  # room for the legend above the bars
    right.set_xticks(modules, [f"m{m}" for m in modules])
    right.set_ylabel("rank")
    right.set_title("planted vs found rank per module", fontsize=10)
    right.legend(fontsize=8, ncol=len(methods) + 1, loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def branches_comparison(demo: ml_collections.ConfigDict, output_dir: Path, log: Callable[[str], None] = print
                        ) -> str:
    """Train AdaPaD, fixed-rank LoRA and ``demo.other_methods`` on the planted benchmark's branches task (seed
    ``demo.seed``, the study's settings, the same budget) to a plateau; write ``comparison_branches.json`` and
    ``comparison_branches.png``, return the text report."""
    from adapad_jax.studies import planted as study
    from adapad_jax.testing.toy import enable_compilation_cache

    enable_compilation_cache()
    task = study.PlantedTask("branches", study.BRANCHES_PLANTED)
    stop = study.StopRule(patience=8, max_steps=int(demo.branches_max_steps),
                          min_steps=min(100, int(demo.branches_max_steps)))
    budget, r_max = study.STUDY_ADAPTER["rank_budget"], study.STUDY_ADAPTER["r_max"]
    records = {}
    for method in comparison_methods(demo):
        log(f"  {method} ...")
        record = study.run_one(task, method, int(demo.seed), study.STUDY_ADAPTER, study.STUDY_OPTIM, stop)
        records[method] = {key: record[key] for key in ("error", "steps", "converged", "total_rank", "ranks",
                                                        "planted_fraction", "extra_on_planted", "spearman")}
    planted = list(task.planted)
    result = {"planted": planted, "budget": budget, "r_max": r_max, "seed": int(demo.seed),
              "best_planted_fraction": study.best_planted_fraction(planted, budget, r_max), "methods": records}
    tmp = output_dir / f".{COMPARISON_FILE}.tmp"
    tmp.write_text(json.dumps(_nan_to_none(result), indent=2) + "\n")
    os.replace(tmp, output_dir / COMPARISON_FILE)
    tmp = output_dir / f".{COMPARISON_PICTURE}.tmp.png"
    plot_comparison(tmp, planted, records)
    os.replace(tmp, output_dir / COMPARISON_PICTURE)
    return "\n".join([
        f"1. Where allocation matters: the planted benchmark's branches task ({len(planted)} toy modules, each planted "
        f"delta learnable only by its own module; planted ranks {planted}). Every method has the same total rank "
        f"budget {budget} (fixed-rank LoRA: rank {budget // len(planted)} everywhere; r_max {r_max}); at most "
        f"{result['best_planted_fraction']:.2f} of it can sit on planted modules. Seed {int(demo.seed)}; all seeds "
        "and methods: docs/RESULTS.md.",
        comparison_table(planted, records),
        f"picture: {output_dir / COMPARISON_PICTURE}",
    ])


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


def report(config: ml_collections.ConfigDict, result: Any, log: Callable[[str], None] = print) -> str:
    """The demo's report: first the branches comparison (AdaPaD vs LoRA vs ``demo.other_methods``, trained now),
    then the DeBERTa-architecture run as the end-to-end pipeline check: accuracy against chance and the backbone
    alone, the planted-vs-found table and agreement (also ``planted_vs_found.json``), the pictures."""
    root = assets_root(config.demo)
    info = json.loads((root / PLANTED_FILE).read_text())
    planted = {k: int(v) for k, v in info["planted"].items()}
    found = dict(result.ranks)
    out = Path(result.output_dir)
    tmp = out / f".{PICTURE_FILE}.tmp.png"
    plot_planted_vs_found(tmp, planted, found)
    os.replace(tmp, out / PICTURE_FILE)
    measures = agreement(planted, found, int(config.adapter.rank_budget), int(config.adapter.r_max))
    tmp = out / f".{AGREEMENT_FILE}.tmp"
    tmp.write_text(json.dumps(_nan_to_none(measures), indent=2) + "\n")
    os.replace(tmp, out / AGREEMENT_FILE)
    accuracy = result.metrics.get("accuracy", float("nan"))
    frequency = info["class_frequency_validation"]
    chance = max(frequency) / max(sum(frequency), 1)
    pipeline = "\n".join([
        f"{'2' if config.demo.branches_check else '1'}. End-to-end pipeline check on the DeBERTaV3 architecture "
        f"(SentencePiece tokenizer, {len(found)} adapted modules, {config.adapter.method}, budget "
        f"{config.adapter.rank_budget}, PEFT export in {out / 'adapter'}): validation accuracy {accuracy:.3f} after "
        f"{result.step} steps (majority class {chance:.3f}, backbone without the planted deltas "
        f"{info['backbone_only_accuracy']:.3f}, teacher {info['teacher_accuracy']:.3f}). In a transformer other "
        "modules can stand in for a planted one, so the found ranks need not follow the planted ones here.",
        rank_table(planted, found),
        agreement_line(measures),
        f"pictures: {out / 'ranks.png'}, {out / PICTURE_FILE}",
    ])
    if not config.demo.branches_check:
        log(pipeline)
        return pipeline
    log("training the comparison on the branches task (toy models, a few seconds to a minute each) ...")
    text = branches_comparison(config.demo, out, log) + "\n\n" + pipeline
    log("\n" + text)
    return text


TASK_HOOKS = TaskHooks(task_spec=DEMO_TASK, prepare_config=prepare_config, report=report)
