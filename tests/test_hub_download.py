"""Hub ids download on first use (config, tokenizer, one weight format) and then work offline.

A tiny Hub look-alike (adapad_jax/testing/hub_server.py) serves a tiny DeBERTaV3 checkpoint on 127.0.0.1;
huggingface_hub talks to it through HF_ENDPOINT, exactly as it would to huggingface.co.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adapad_jax.models.checkpoint_io import hub_download_patterns
from adapad_jax.testing import tiny
from adapad_jax.testing.hub_server import HubServer

REPO = Path(__file__).resolve().parents[1]
REPO_ID = "tiny-org/tiny-deberta"


@pytest.fixture(scope="module")
def hub_repo(tmp_path_factory) -> dict[str, str]:
    """A tiny checkpoint laid out like a hub repo with extra files a download must skip, plus data files."""
    root = tmp_path_factory.mktemp("hub")
    ckpt = root / "repo"
    tiny.build_tiny_deberta(ckpt, task="classification", num_labels=2, seed=1)
    (ckpt / "pytorch_model.bin").write_bytes(b"not a pickle: must not be downloaded when safetensors exist")
    (ckpt / "tf_model.h5").write_bytes(b"tensorflow weights: never downloaded")
    (ckpt / "README.md").write_text("model card\n")
    files = tiny.write_tiny_glue(root / "data", "glue_sst2", n_train=16, n_val=8)
    return {"repo": str(ckpt), "train": files.train_file, "val": files.validation_file, "root": str(root)}


def _env(hub: HubServer, hf_home: Path, offline: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(PYTHONPATH=str(REPO), HF_ENDPOINT=hub.endpoint, HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY="1")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def _train(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), *args], capture_output=True,
                          text=True, timeout=300, env=env, cwd=str(cwd))


def test_a_resume_keeps_the_model_revision():
    from adapad_jax.config.schema import ConfigError, base_config
    from adapad_jax.run.checks import check_resume

    config = base_config()
    config.output_dir = "runs/x"
    previous = config.to_json()
    config.model.revision = "v2"
    with pytest.raises(ConfigError, match="model.revision=''"):
        check_resume(config, previous)


def test_download_patterns_prefer_safetensors_and_fall_back_to_bin():
    both = hub_download_patterns(["config.json", "model.safetensors", "pytorch_model.bin", "tf_model.h5"])
    assert "model.safetensors" in both and not any("pytorch_model" in p for p in both)
    bin_only = hub_download_patterns(["config.json", "pytorch_model.bin", "spm.model"])
    assert "pytorch_model.bin" in bin_only and not any("safetensors" in p for p in bin_only)
    assert "config.json" in both and "spm.model" in bin_only


@pytest.mark.slow
def test_hub_id_downloads_once_then_runs_offline(hub_repo, tmp_path):
    hf_home = tmp_path / "hf"
    args = [
        "--config", str(REPO / "configs" / "glue_sst2.py"),
        f"--config.model.name_or_path={REPO_ID}", "--config.model.revision=v1.0",
        f"--config.data.train_file={hub_repo['train']}", f"--config.data.validation_file={hub_repo['val']}",
        "--config.data.max_length=32", "--config.train.num_steps=0", "--config.train.eval_batch_size=8",
        "--config.adapter.rank_budget=100",
    ]
    with HubServer({REPO_ID: hub_repo["repo"]}, revisions=("main", "v1.0")) as hub:
        first = _train([*args, f"--config.output_dir={tmp_path / 'run1'}"], _env(hub, hf_home, False), tmp_path)
        assert first.returncode == 0, first.stderr[-3000:]
        # The revision reached the hub, and only config, tokenizer and safetensors weights were fetched.
        assert f"/api/models/{REPO_ID}/revision/v1.0" in hub.paths("GET")
        fetched = sorted({p.rsplit("/", 1)[-1] for p in hub.paths("GET") if "/resolve/" in p})
        assert fetched == ["config.json", "model.safetensors", "spm.model", "tokenizer.json",
                           "tokenizer_config.json"], fetched
        snapshots = list((hf_home / "hub" / f"models--{REPO_ID.replace('/', '--')}" / "snapshots").iterdir())
        assert len(snapshots) == 1 and sorted(p.name for p in snapshots[0].iterdir()) == fetched
        assert (hf_home / "hub" / f"models--{REPO_ID.replace('/', '--')}" / "refs" / "v1.0").is_file()

        seen = len(hub.requests)
        second = _train([*args, f"--config.output_dir={tmp_path / 'run2'}"], _env(hub, hf_home, True), tmp_path)
        assert second.returncode == 0, second.stderr[-3000:]
        assert len(hub.requests) == seen, hub.requests[seen:]  # offline: the server saw nothing
    first_metrics = json.loads((tmp_path / "run1" / "eval_results.json").read_text())["metrics"]
    second_metrics = json.loads((tmp_path / "run2" / "eval_results.json").read_text())["metrics"]
    assert first_metrics == second_metrics


def _resolve(code_args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    code = (
        "import sys\nfrom adapad_jax.models.checkpoint_io import CheckpointError, resolve_checkpoint_dir\n"
        f"try:\n    print(resolve_checkpoint_dir({code_args}))\n"
        "except CheckpointError as err:\n    print(err, file=sys.stderr); sys.exit(2)\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                          cwd=str(cwd))


def test_missing_repo_revision_and_offline_miss_are_one_clear_line(hub_repo, tmp_path):
    hf_home = tmp_path / "hf"
    with HubServer({REPO_ID: hub_repo["repo"]}) as hub:
        missing = _resolve("'tiny-org/no-such-model'", _env(hub, hf_home, False), tmp_path)
        assert missing.returncode == 2
        lines = missing.stderr.strip().splitlines()
        assert len(lines) == 1 and "'tiny-org/no-such-model'" in lines[0] and "nor a model on the hub" in lines[0]

        bad_revision = _resolve(f"'{REPO_ID}', 'no-such-branch'", _env(hub, hf_home, False), tmp_path)
        assert bad_revision.returncode == 2
        assert bad_revision.stderr.strip().splitlines() == [
            f"model '{REPO_ID}' at revision 'no-such-branch': the hub repo has no such revision (model.revision)"
        ]

        seen = len(hub.requests)
        offline = _resolve(f"'{REPO_ID}'", _env(hub, hf_home, True), tmp_path)
        assert offline.returncode == 2 and len(hub.requests) == seen
        lines = offline.stderr.strip().splitlines()
        assert len(lines) == 1 and "not in the local Hugging Face cache" in lines[0] and "HF_HUB_OFFLINE" in lines[0]

        downloaded = _resolve(f"'{REPO_ID}'", _env(hub, hf_home, False), tmp_path)
        assert downloaded.returncode == 0, downloaded.stderr[-2000:]
        assert (Path(downloaded.stdout.strip()) / "model.safetensors").is_file()
