"""Training: optimizer, train state, one compiled step per stage, loop, checkpoints."""
