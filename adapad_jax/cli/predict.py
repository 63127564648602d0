"""Predict with a trained run on new data, labelled or not, without touching the run's files.

    adapad-predict --run_dir runs/cola --config.data.test_file=CoLA_test.tsv        # -> runs/cola/predict-step<N>/CoLA.tsv
    adapad-predict --run_dir runs/squad_v2 --step 2000 --config.data.test_file=dev-v2.0.json --out preds/

(``python -m adapad_jax.cli.predict`` and ``python launch/predict.py`` are the same command.) The test file is
jsonl, json (also the official nested SQuAD format), csv, tsv (GLUE's test files) or parquet, with the task's
text columns (GLUE) or id/context/question (SQuAD); labels / answers are optional (missing, empty or -1 = none).
For MNLI give "matched_file,mismatched_file". Writes GLUE submission TSVs (CoLA.tsv, MNLI-m.tsv, ...) or the
official SQuAD predictions.json (+ na_probs.json for v2), predictions.jsonl, and metrics.json when the file
has labels. Bad input stops with one line on stderr and exit code 2, before the model is loaded.
"""

from __future__ import annotations

from adapad_jax.cli.common import quiet_start, run_app

quiet_start()

import sys  # noqa: E402

import ml_collections  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from adapad_jax.cli.errors import fail, start_command, unknown_field_message, user_errors  # noqa: E402


def predict_fields() -> ml_collections.ConfigDict:
    """The ``--config.<field>`` overrides adapad-predict takes (everything else comes from the run's config)."""
    config = ml_collections.ConfigDict()
    config.data = ml_collections.ConfigDict()
    config.data.test_file = ""  # file(s) to predict on; MNLI: "matched,mismatched"
    config.train = ml_collections.ConfigDict()
    config.train.eval_batch_size = 0  # 0 = the run's train.eval_batch_size
    return config


_RUN_DIR = flags.DEFINE_string("run_dir", None, "Output directory of an adapad-train run.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to predict with (default: the step the run exported, "
                             "its best with train.select_best; the first line says which and why).")
_OUT = flags.DEFINE_string("out", None, "Where to write (default: <run_dir>/predict-step<N>).")
try:  # config_flags applies --config.<field> overrides of a config dict as soon as the flag is defined
    _CONFIG = config_flags.DEFINE_config_dict("config", predict_fields(), "Fields: data.test_file, train.eval_batch_size.")
except (AttributeError, KeyError) as err:
    fail(unknown_field_message(sys.argv, err).replace("adapad_jax/config/schema.py:base_config", "adapad-predict --help"))
except (TypeError, ValueError) as err:
    fail(f"bad --config override: {err}")


def _main(argv: list[str]) -> None:
    """Restore one checkpoint of a run and write its predictions on the test file."""
    start_command(argv)
    from adapad_jax.training.preemption import install_exit_on_signal

    install_exit_on_signal()
    if not _RUN_DIR.value:
        fail("no run directory given: pass --run_dir <output_dir of a training run>")
    config = _CONFIG.value
    if config.train.eval_batch_size < 0:
        fail(f"train.eval_batch_size={config.train.eval_batch_size} must be >= 0")
    with user_errors():
        from adapad_jax.run.prediction import predict

        predict(_RUN_DIR.value, config.data.test_file, step=_STEP.value, out_dir=_OUT.value,
                eval_batch_size=int(config.train.eval_batch_size))


def main() -> None:
    """Console-script entry point (``adapad-predict``)."""
    run_app(_main, __name__)


if __name__ == "__main__":
    main()
