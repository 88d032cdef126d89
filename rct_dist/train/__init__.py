"""Training: the DeepSpeed engine, the one loop for teacher training and transfer, checkpoints, logs."""
