"""exitflow stages: what each DAG node does, and the PyTorch core they share (nets, data, flops)."""
