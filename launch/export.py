"""Export a checkpoint of a run: a checkout's wrapper of ``adapad-export`` (see adapad_jax/cli/export.py).

    python launch/export.py --run_dir runs/demo                       # newest checkpoint -> runs/demo/export-step<N>
    python launch/export.py --run_dir runs/demo --step 100 --out /tmp/adapter_100 --merged --dtype bfloat16
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapad_jax.cli.export import main  # noqa: E402

if __name__ == "__main__":
    main()
