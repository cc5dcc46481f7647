"""The code file MLflow stores with every early-exit model ("models from code"): it names the model's class,
so a logged model holds source and data files only, never a pickle. `mlflow.pyfunc.load_model` runs
this file, then `EarlyExitModel.load_context` rebuilds the net from the model's own artifacts."""

import mlflow

from exitflow.stages.mlflow_model import EarlyExitModel

mlflow.models.set_model(EarlyExitModel())
