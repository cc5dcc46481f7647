"""The PyTorch core: nets, data, phases, the training loop, evaluation maths, FLOPs, plots.

Nothing under `stages/core/` imports Ray or MLflow (a test checks it): it runs in a notebook,
on a laptop, anywhere torch does. The stage modules beside this package adapt it to Ray and
MLflow.
"""
