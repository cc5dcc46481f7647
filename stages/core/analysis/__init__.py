"""The paper's analyses of why the regimes differ (section 3): pure PyTorch, one module each."""
