"""exitflow's stage kinds: one module per kind (train, tune, evaluate, report, analyze_*), each
registered with `pipeline.stage` and found by the registry (`pipeline.kinds`), with the modules they
share (phase, phase_plan, analysis_inputs, checkpoints) and their Ray sides (ray_train, ray_tune,
imported only where a phase runs); and `stages.core`, the PyTorch core they build on, which imports
neither Ray nor MLflow. docs/layers.md maps the layers."""
