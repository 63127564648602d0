"""What a run writes: atomic output sets, the per-rank outputs and the model card."""
