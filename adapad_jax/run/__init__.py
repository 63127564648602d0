"""A run: training end to end, restoring a saved run, prediction, the output-dir lock, resume identity."""
