"""Train AdaPaD (or the joint / lora baselines) from an ml_collections config file.

    adapad-train --preset demo                                    # a config shipped with the package
    adapad-train --config configs/squad_v2.py --config.output_dir=runs/squad_v2
    adapad-train --preset glue_rte --config.train.num_steps=0     # evaluate + export only

(``python -m adapad_jax.cli.train`` and ``python launch/train.py`` are the same command.) ``--preset NAME``
is the config file ``NAME.py`` shipped in ``adapad_jax/configs`` (the checkout's ``configs/``).

Any field of the config can be overridden with --config.<field>=<value>; ``--show_config`` lists every field
with its value and what it means (``adapad-train --preset glue_rte --show_config``). Bad input (unknown or
ill-typed field, missing model or data file, budget below the module count, a mesh that does not fit) stops
before any compute with one line on stderr and exit code 2. Rerunning on an output_dir with checkpoints resumes.

Several hosts (JAX multi-process): run the same command on every host with, per process,
    JAX_COORDINATOR_ADDRESS=<host of process 0>:<port> JAX_NUM_PROCESSES=<N> JAX_PROCESS_ID=<0..N-1>
or, on a cluster that jax.distributed.initialize() detects (SLURM, Open MPI, Kubernetes, TPU pods),
ADAPAD_DISTRIBUTED=auto. jax.distributed is started before any device is used; the mesh then spans the
devices of all processes (mesh.data x mesh.components must equal the global device count), each process
reads its block of every global batch, and only process 0 writes into the output directory (the checkpoints
are written by orbax from every process, so output_dir must be on a filesystem that all hosts share).
"""

from __future__ import annotations

import sys

from adapad_jax.cli.common import describe_config, expand_preset, overridden_fields, quiet_start, run_app

quiet_start()

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from adapad_jax.cli.errors import (  # noqa: E402
    fail,
    loaded_config_or_fail,
    start_command,
    user_errors,
)

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file with get_config(), e.g. configs/demo.py.", lock_config=True
)
flags.DEFINE_string("preset", None, "Name of a config file shipped with the package (e.g. glue_cola, squad_v2, demo).")
_SHOW_CONFIG = flags.DEFINE_bool(
    "show_config", False, "Print every config field as `field = value  # what it means` (the --preset / --config "
    "file with the --config.<field> overrides, else the defaults) and exit without training."
)


def _main(argv: list[str]) -> None:
    """Validate the config, then train, evaluate and export (or resume)."""
    start_command(argv, "; fields are set with --config.<field>=<value>")
    config = _CONFIG.value
    if config is None and flags.FLAGS["config"].present:
        fail(f"the config file {flags.FLAGS['config'].config_filename!r} returned None from get_config(): it must "
             "return an ml_collections.ConfigDict (e.g. built on adapad_jax.config.base_config())")
    if _SHOW_CONFIG.value:
        from adapad_jax.config.schema import base_config

        print(describe_config(base_config() if config is None else loaded_config_or_fail(config)))
        return
    if config is None:
        fail("no config given: pass --preset <name> (e.g. --preset demo) or --config <file.py>")
    from adapad_jax.training.preemption import install_exit_on_signal

    install_exit_on_signal()
    loaded_config_or_fail(config)
    with user_errors():
        from adapad_jax.config.validation import check_method_overrides
        from adapad_jax.run.checks import check_budget_overrides

        check_method_overrides(config.adapter.method, overridden_fields(sys.argv[1:]))
        check_budget_overrides(config, overridden_fields(sys.argv[1:]))
        from adapad_jax.run.core import run

        result = run(config, progress=True)  # a bar on a terminal, lines in a log file (adapad_jax.progress)
        from adapad_jax.data.task_hooks import hooks_for

        hooks = hooks_for(config.task)
        if hooks is not None:
            hooks.report(config, result)


def main() -> None:
    """Parse ``sys.argv`` and run the command in this process."""
    try:
        sys.argv = expand_preset(sys.argv)
    except ValueError as err:
        fail(str(err))
    run_app(_main, __name__)


def console_main() -> None:
    """Process entry point (``adapad-train``, ``python -m``, ``launch/train.py``): tune malloc, watch from a parent
    process when this is not process 0 of a multi-process run (adapad_jax/runtime/supervise.py), then :func:`main`."""
    from adapad_jax.runtime.host_malloc import reexec_with_tuned_malloc
    from adapad_jax.runtime.supervise import supervise_if_worker

    reexec_with_tuned_malloc()
    supervise_if_worker()
    main()


if __name__ == "__main__":
    console_main()
