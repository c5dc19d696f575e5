"""Evaluation: metric functions (metrics.py); benchmark loaders and the evaluate/infer CLIs follow."""
