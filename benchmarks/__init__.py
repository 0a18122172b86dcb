"""Benchmarks of rlhf_jax against the PyTorch/transformers/TRL peer: see benchmarks/README.md."""
