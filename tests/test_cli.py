"""launch/train.py and launch/export.py as a user runs them: bad input stops with one line, nothing is lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "launch" / "train.py"
EXPORT = REPO / "launch" / "export.py"
PRECIOUS = {"keep.txt": "precious results", "eval_results.json": '{"metrics": {"accuracy": 0.9}}'}


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, str]:
    """A checkpoint dir with only config.json (validation reads nothing else) and tiny RTE files."""
    import transformers

    from adapad_jax.testing.tiny import write_tiny_glue

    root = tmp_path_factory.mktemp("cli")
    ckpt = root / "ckpt"
    transformers.DebertaV2Config(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        relative_attention=True, position_buckets=8, pos_att_type=["p2c", "c2p"], position_biased_input=False,
        type_vocab_size=0,
    ).save_pretrained(str(ckpt))  # 2 layers x 6 targets = 12 adapted modules
    files = write_tiny_glue(root / "data", "rte", n_train=8, n_val=4)
    no_label = root / "no_label.jsonl"
    no_label.write_text(json.dumps({"sentence1": "a", "sentence2": "b", "idx": 0}) + "\n")
    not_json = root / "not_json.jsonl"
    not_json.write_text('{"sentence1": "a", "sentence2": \n')
    return {"ckpt": str(ckpt), "train": files.train_file, "validation": files.validation_file,
            "no_label": str(no_label), "not_json": str(not_json), "root": str(root)}


def run_cli(script: Path, args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=str(REPO))


def _stderr_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


CASES = {
    "unknown field": (["--config.adapter.rank_budgett=20"],
                      "unknown config field 'adapter.rank_budgett' (did you mean \"rank_budget\" instead?)"),
    "unknown section": (["--config.trainer.steps=2"], "unknown config field 'trainer.steps'"),
    "ill-typed int": (["--config.adapter.r_max=eight"], "--config.adapter.r_max=eight"),
    "ill-typed bool": (["--config.adapter.grow=perhaps"], "--config.adapter.grow=perhaps"),
    "r_max below 1": (["--config.adapter.r_max=0"], "adapter.r_max=0 must be >= 1"),
    "unknown method": (["--config.adapter.method=dora"], "adapter.method='dora' is not one of"),
    "mesh too big": (["--config.mesh.data=16"], "needs 16 devices"),
    "mesh vs r_max": (["--config.mesh.components=3"], "mesh.components=3 does not divide adapter.r_max=4"),
    "budget below modules": (["--config.adapter.rank_budget=11"], "rank_budget=11 is below the 12 adapted modules"),
    "missing model": (["--config.model.name_or_path={root}/no_model"], "no_model' does not exist"),
    "missing data": (["--config.data.train_file={root}/absent.jsonl"], "absent.jsonl' does not exist"),
    "data lacks columns": (["--config.data.train_file={no_label}"], "lacks column(s) label"),
    "data not valid": (["--config.data.validation_file={not_json}"], "is not valid JSON"),
    "batch vs accumulation": (["--config.train.grad_accum_steps=3"],
                              "train.batch_size=32 is not divisible by train.grad_accum_steps=3 x mesh.data=1"),
    "profile after the end": (["--config.train.num_steps=5", "--config.train.profile_start_step=9"],
                              "train.profile_start_step=9 is after the run's last step (5)"),
}


@pytest.fixture(scope="module")
def case_results(assets, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Run every bad-input case at once (separate processes; most of their time is imports)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    running = {}
    for case, (overrides, _) in CASES.items():
        out = tmp_path_factory.mktemp("case") / "out"
        out.mkdir()
        for name, text in PRECIOUS.items():
            (out / name).write_text(text)
        args = [
            "--config", str(REPO / "configs" / "glue_rte.py"),
            f"--config.output_dir={out}",
            f"--config.model.name_or_path={assets['ckpt']}",
            f"--config.data.train_file={assets['train']}",
            f"--config.data.validation_file={assets['validation']}",
            *[o.format(**assets) for o in overrides],
        ]
        process = subprocess.Popen([sys.executable, str(TRAIN), *args], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env=env, cwd=str(REPO))
        running[case] = (process, args, out)
    results = {}
    for case, (process, args, out) in running.items():
        stdout, stderr = process.communicate(timeout=600)
        results[case] = (subprocess.CompletedProcess(args, process.returncode, stdout, stderr), out)
    return results


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_stops_with_one_line_and_leaves_output_dir_alone(case_results, case):
    result, out = case_results[case]
    expected = CASES[case][1]
    lines = _stderr_lines(result)
    assert result.returncode != 0
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(PRECIOUS)
    for name, text in PRECIOUS.items():
        assert (out / name).read_text() == text


def test_missing_config_file_and_missing_flag(tmp_path):
    result = run_cli(TRAIN, ["--config", str(tmp_path / "nope.py")])
    assert result.returncode != 0 and _stderr_lines(result) == [f"error: config file not found: '{tmp_path / 'nope.py'}'"]
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config():\n    raise ValueError('broken on purpose')\n")
    result = run_cli(TRAIN, ["--config", str(broken)])
    assert result.returncode != 0 and _stderr_lines(result) == [
        f"error: flag --config={broken}: the config file raised ValueError: broken on purpose"]
    result = run_cli(TRAIN, [])
    assert result.returncode != 0 and len(_stderr_lines(result)) == 1 and "--config" in result.stderr


def test_export_of_a_directory_that_is_not_a_run(tmp_path):
    result = run_cli(EXPORT, ["--run_dir", str(tmp_path)])
    lines = _stderr_lines(result)
    assert result.returncode != 0 and len(lines) == 1 and "is not a run directory" in lines[0], result.stderr
    assert list(tmp_path.iterdir()) == []


LAUNCH = ("train", "export", "predict", "bilinear", "planted", "planted_head_drift", "benchmark")


def test_help_exits_zero_on_every_command():
    """`cmd --help && ...` works: --help (and absl's --helpfull) prints the command's usage and exits 0."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    calls = [(name, flag) for name in LAUNCH for flag in ("--help",)] + [("train", "--helpfull"), ("export", "-?")]
    running = [(name, flag, subprocess.Popen([sys.executable, str(REPO / "launch" / f"{name}.py"), flag],
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                             cwd=str(REPO)))
               for name, flag in calls]
    for name, flag, process in running:
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, (name, flag, stderr[-2000:])
        assert f"launch/{name}.py" in stdout, (name, flag, stdout[:500])  # the command's own usage text
        if name not in ("benchmark", "planted_head_drift"):  # absl commands (benchmark: argparse; drift: no flags)
            assert "flags:" in stdout, (name, flag, stdout[:500])


def test_train_help_names_show_config_which_lists_every_field_with_its_meaning(tmp_path):
    """--help points at --show_config; --show_config prints each field as `field = value  # meaning`, with the
    config file and overrides applied, and exits 0 without creating anything."""
    from adapad_jax.cli.common import flatten_config
    from adapad_jax.config.schema import base_config, field_docs

    help_text = run_cli(TRAIN, ["--help"])
    assert help_text.returncode == 0 and "--[no]show_config" in help_text.stdout
    out = tmp_path / "out"
    result = run_cli(TRAIN, ["--config", str(REPO / "configs" / "glue_rte.py"), "--config.adapter.r_max=4",
                             f"--config.output_dir={out}", "--show_config"])
    assert result.returncode == 0 and result.stderr == "", result.stderr
    lines = result.stdout.splitlines()
    fields = {line.split(" = ", 1)[0]: line.split(" = ", 1)[1] for line in lines}
    base, docs = flatten_config(base_config()), field_docs()
    assert list(fields) == list(docs) and set(fields) == set(base)  # every field once, in the schema's order
    assert fields["adapter.r_max"] == "4  # Rank-1 slots per module: the most rank one module can reach (adapad / joint)."
    assert fields["task"].startswith("'glue_rte'  # One of TASK_NAMES")
    assert fields["logging.wandb"].startswith("False  # Log the same to Weights & Biases")
    assert all(docs.values())  # every field of the schema has its comment
    assert docs["data.validation_file"] == docs["data.train_file"]  # a comment covers the fields right below it
    assert not out.exists()
    defaults = run_cli(TRAIN, ["--show_config"])
    assert defaults.returncode == 0 and "task = 'glue_sst2'  # " in defaults.stdout
