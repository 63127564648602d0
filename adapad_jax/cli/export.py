"""Export any checkpoint of a finished or running run as a PEFT adapter (and optionally a merged checkpoint).

    adapad-export --run_dir runs/demo                       # the step the run exported -> runs/demo/export-step<N>
    adapad-export --run_dir runs/demo --step 100 --out /tmp/adapter_100 --merged --dtype bfloat16

(``python -m adapad_jax.cli.export`` and ``python launch/export.py`` are the same command.) Reads the run's
config.json, rebuilds the model, restores the checkpoint and writes ``adapter/`` (PEFT, with a model card
README.md), ``ranks.json``, ``ranks.png`` and, with --merged, ``merged/`` (config.json, model.safetensors in
--dtype and the tokenizer files, for plain transformers) into --out.

Several hosts (JAX multi-process): the same environment as adapad-train starts jax.distributed
(JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, or ADAPAD_DISTRIBUTED=auto); every process
restores the checkpoint and only process 0 writes. On one host no variable is needed.
"""

from __future__ import annotations

from adapad_jax.cli.common import quiet_start, run_app

quiet_start()

from absl import flags  # noqa: E402

from adapad_jax.cli.errors import fail, start_command, user_errors  # noqa: E402

_RUN_DIR = flags.DEFINE_string("run_dir", None, "Output directory of an adapad-train run.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the step the run exported, its best "
                             "with train.select_best; the first line says which and why).")
_OUT = flags.DEFINE_string("out", None, "Where to write (default: <run_dir>/export-step<N>).")
_MERGED = flags.DEFINE_bool("merged", False, "Also write a merged transformers checkpoint in <out>/merged.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "dtype of the merged checkpoint's weights.")


def _main(argv: list[str]) -> None:
    """Restore one checkpoint of a run and export it."""
    start_command(argv)
    from adapad_jax.training.preemption import install_exit_on_signal

    install_exit_on_signal()
    if not _RUN_DIR.value:
        fail("no run directory given: pass --run_dir <output_dir of a training run>")
    with user_errors():
        from adapad_jax.run.saved_run import export_checkpoint

        export_checkpoint(
            _RUN_DIR.value, step=_STEP.value, out_dir=_OUT.value, merged=_MERGED.value, merged_dtype=_DTYPE.value
        )


def main() -> None:
    """Console-script entry point (``adapad-export``)."""
    run_app(_main, __name__)


if __name__ == "__main__":
    main()
