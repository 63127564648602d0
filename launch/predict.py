"""Predict with a trained run: a checkout's wrapper of ``adapad-predict`` (see adapad_jax/cli/predict.py).

    python launch/predict.py --run_dir runs/cola --config.data.test_file=CoLA_test.tsv
    python launch/predict.py --run_dir runs/squad_v2 --step 2000 --config.data.test_file=dev-v2.0.json --out preds/
"""

from adapad_jax.cli.predict import main

if __name__ == "__main__":
    main()
