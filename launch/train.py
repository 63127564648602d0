"""Train from a config file: a checkout's wrapper of ``adapad-train`` (see adapad_jax/cli/train.py).

    python launch/train.py --config configs/demo.py
    python launch/train.py --config configs/squad_v2.py --config.output_dir=runs/squad_v2
    python launch/train.py --preset glue_rte --config.train.num_steps=0   # evaluate + export only
"""

from adapad_jax.cli.train import console_main

if __name__ == "__main__":
    console_main()
