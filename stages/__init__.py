"""exitflow's stages: one module per stage kind (train, tune, evaluate, report; they may use Ray),
and `stages.core`, the PyTorch core they share, which imports neither Ray nor MLflow."""
