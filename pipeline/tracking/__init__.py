"""MLflow: the run's tracking (tracker.py: rank-0 run, metrics, params, outage-tolerant sender), its training
curves (plots.py) and the model registry (registry.py: register, pull by alias or version)."""
