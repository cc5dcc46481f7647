"""exitflow's pipeline: the stage API the kinds build on (registry, DAG, spec) and the orchestration
that runs them (graph -> keys -> runner and its Ray tasks -> typed MLflow artifacts). docs/layers.md."""

__version__ = "0.1.0"
