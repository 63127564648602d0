"""Every method through the command a researcher runs: ``launch/train.py --config configs/glue_cola.py
--config.adapter.method=<m>`` on a tiny local DeBERTaV3 stand-in and CoLA-schema files, a few steps.

Each run must exit 0 and write eval_results.json (with the adapter parameter counts), metrics.jsonl (a record of
them), the PEFT adapter and its model card. The budget is given in parameters, ``adapter.param_budget`` = 2 x
sum(in + out), so the counts are hand-computed: the tiny model adapts 12 modules (2 layers x query / key / value /
attention output 32 + 32 = 64 and intermediate / output 32 + 64 = 96), sum(in + out) = 2 x (4 x 64 + 2 x 96)
= 896; that budget is rank_budget 2 x 12 = 24 for a growing method and lora_rank 2 for lora. The factor count is
also checked against the exported adapter itself: the elements of its lora_A / lora_B tensors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "launch" / "train.py"
SUM_WIDTHS = 2 * (4 * 64 + 2 * 96)
PARAM_BUDGET = 2 * SUM_WIDTHS

# The methods wired onto the seam.
WIRED = ("adapad", "joint", "lora", "adalora", "increlora", "sora", "ardlora")
# Hand-computed factor counts after 4 steps (no growth before step 2T): rank 1 in each module; lora rank 2.
EXPECTED_FACTORS = {"adapad": SUM_WIDTHS, "joint": SUM_WIDTHS, "lora": 2 * SUM_WIDTHS}
# Overrides a 4-step run needs on top of the preset: CoLA's published AdaLoRA schedule (tinit 800, tfinal 3500) has
# no budgeting phase in 4 steps and is refused up front.
METHOD_ARGS = {"adalora": ["--config.adapter.adalora.tinit=1", "--config.adapter.adalora.tfinal=1"]}


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, str]:
    from adapad_jax.testing.tiny import build_tiny_deberta, write_tiny_glue

    root = tmp_path_factory.mktemp("methods")
    build_tiny_deberta(root / "ckpt", task="classification", num_labels=2, seed=1)
    files = write_tiny_glue(root / "data", "glue_cola", n_train=16, n_val=8)
    return {"ckpt": str(root / "ckpt"), "train": files.train_file, "validation": files.validation_file}


def train(assets: dict[str, str], method: str, out: Path) -> subprocess.CompletedProcess:
    args = [
        "--config", str(REPO / "configs" / "glue_cola.py"), f"--config.adapter.method={method}",
        f"--config.output_dir={out}", f"--config.model.name_or_path={assets['ckpt']}",
        f"--config.data.train_file={assets['train']}", f"--config.data.validation_file={assets['validation']}",
        "--config.data.max_length=32", "--config.train.num_steps=4", "--config.train.batch_size=8",
        "--config.train.eval_batch_size=8", "--config.train.log_every_steps=2", "--config.checkpoint.every_steps=2",
        f"--config.adapter.param_budget={PARAM_BUDGET}", f"--config.compilation_cache_dir={out.parent / 'cache'}",
        *METHOD_ARGS.get(method, []),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(TRAIN), *args], capture_output=True, text=True, timeout=900,
                          env=env, cwd=str(REPO))


def lora_tensor_elements(adapter_dir: Path) -> int:
    from safetensors.numpy import load_file

    return sum(t.size for name, t in load_file(str(adapter_dir / "adapter_model.safetensors")).items()
               if ".lora_A." in name or ".lora_B." in name)


def check_run(assets: dict[str, str], method: str, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    result = train(assets, method, out)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    field, value = ("lora_rank", 2) if method == "lora" else ("rank_budget", 24)
    assert f"budget: adapter.param_budget={PARAM_BUDGET} -> adapter.{field}={value}" in log

    results = json.loads((out / "eval_results.json").read_text())
    counts = results["adapter_parameters"]
    assert counts["factors"] == EXPECTED_FACTORS.get(method, counts["factors"])
    assert counts["factors"] == lora_tensor_elements(out / "adapter")
    assert counts["factors"] <= counts["with_extras"] <= counts["with_reserves"]
    assert counts["param_budget"] == PARAM_BUDGET and counts["converted_to"] == {f"adapter.{field}": value}
    assert counts["head"] > 0 and isinstance(counts["paper"], int) and counts["paper_count"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["adapter_parameters"] for r in records if "adapter_parameters" in r] == [counts]
    card = (out / "adapter" / "README.md").read_text()
    assert "## Adapter parameters" in card and f"| {counts['factors']:,} |" in card
    assert f"adapter parameters: factors {counts['factors']:,}" in log
    return out


@pytest.mark.parametrize("method", WIRED)
def test_glue_cola_trains_exports_and_counts_with_every_wired_method(assets, method, tmp_path):
    from adapad_jax.run.saved_run import export_checkpoint

    out = check_run(assets, method, tmp_path)
    counts = json.loads((out / "eval_results.json").read_text())["adapter_parameters"]
    exported = export_checkpoint(out, out_dir=str(tmp_path / "export"), log=lambda line: None)
    card = (exported / "adapter" / "README.md").read_text()  # adapad-export after the fact: the same counts
    assert f"| factors (committed rank x (in + out)) | {counts['factors']:,} |" in card
    assert f"| with reserves (every row that trains) | {counts['with_reserves']:,} |" in card
