"""`python -m adapad_jax.train`: the same command as `adapad-train` (adapad_jax/cli/train.py)."""

if __name__ == "__main__":
    from adapad_jax.cli.train import main

    main()
