"""Training: objectives, optimizer, the jitted train step, evaluation, checkpoints, loop."""
