"""swin-pipeline: DALI loading, DeepSpeed training of timm's Swin, MLflow tracking (see README)."""
