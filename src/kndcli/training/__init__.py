"""Training: the only package that imports Lightning or wandb."""
