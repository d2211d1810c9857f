"""Training: state, the pure train/eval steps, checkpoints, the one loop, the stages."""
