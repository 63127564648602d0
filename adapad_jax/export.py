"""`python -m adapad_jax.export`: the same command as `adapad-export` (adapad_jax/cli/export.py)."""

if __name__ == "__main__":
    from adapad_jax.cli.export import main

    main()
