"""Predict with a trained run: a checkout's wrapper of ``adapad-predict`` (see adapad_jax/cli/predict.py).

    python launch/predict.py --run_dir runs/cola --config.data.test_file=CoLA_test.tsv
    python launch/predict.py --run_dir runs/squad_v2 --step 2000 --config.data.test_file=dev-v2.0.json --out preds/
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapad_jax.cli.predict import main  # noqa: E402

if __name__ == "__main__":
    main()
