"""Training: the pivotal-tuning trainer (new-token rows + UNet LoRA) and its parts: losses, optimizers,
checkpoints, memory fit, step hooks, failure messages. Imports models, dataset and formats; never inference."""
