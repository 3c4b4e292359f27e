"""Training: the E-MSA optimizer (msa), straight-through baselines (ste) and the loop (loop)."""
