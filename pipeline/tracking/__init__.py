"""MLflow: the run's tracking (tracker.py: rank-0 run, metrics, params, outage-tolerant sender), its training
curves (plots.py), the model registry (registry.py: register, pull by alias or version) and each version's
evaluation scores per shard set, kept as version tags (scores.py, written by `python -m pipeline.evaluate`)."""
