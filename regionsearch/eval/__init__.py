"""Evaluation: the synthetic world, the reference-model training and `regionsearch eval`."""
