"""The training engine: DeepSpeed setup, optimizer and schedule, the step, evaluation, checkpoints, export."""
