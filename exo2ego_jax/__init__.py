"""exo2ego_jax: Exo2Ego (exocentric-knowledge-guided egocentric video MLLM) in JAX/Flax."""
__version__ = "0.1.0"


def load_pretrained(path, **kwargs):
    """Open a converted checkpoint as `(module, params)`; see `exo2ego_jax.checkpoints.load_pretrained`."""
    from exo2ego_jax.checkpoints import load_pretrained as _load
    return _load(path, **kwargs)
