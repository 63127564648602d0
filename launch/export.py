"""Export a checkpoint of a run: a checkout's wrapper of ``adapad-export`` (see adapad_jax/cli/export.py).

    python launch/export.py --run_dir runs/demo                       # newest checkpoint -> runs/demo/export-step<N>
    python launch/export.py --run_dir runs/demo --step 100 --out /tmp/adapter_100 --merged --dtype bfloat16
"""

from adapad_jax.cli.export import main

if __name__ == "__main__":
    main()
