"""MLflow: the store a command talks to, resolved once into one value (store.py), the run's tracking (tracker.py:
the rank-0 run's life; params.py: what it records; sender.py: the outage-tolerant background sender;
system_metrics.py: per-node system metrics), its training curves (plots.py), the model registry (registry.py:
register, pull by alias or version; mlflow_model.py and swin_pyfunc.py: a version as an MLflow model) and each
version's evaluation scores per shard set, kept as version tags (scores.py, written by `python -m
pipeline.evaluate`)."""
