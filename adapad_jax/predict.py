"""`python -m adapad_jax.predict`: the same command as `adapad-predict` (adapad_jax/cli/predict.py)."""

if __name__ == "__main__":
    from adapad_jax.cli.predict import main

    main()
