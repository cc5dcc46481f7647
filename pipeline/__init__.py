"""exitflow's orchestration: spec -> graph -> runner (Ray tasks) -> typed MLflow artifacts."""

__version__ = "0.1.0"
