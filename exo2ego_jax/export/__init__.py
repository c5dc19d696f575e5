"""Weights out: `python -m exo2ego_jax.export {peft,hf,videollama2} --checkpoint DIR --out OUT` (exporters.py)."""
