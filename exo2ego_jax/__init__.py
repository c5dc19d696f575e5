"""exo2ego_jax: Exo2Ego (exocentric-knowledge-guided egocentric video MLLM) in JAX/Flax.

`exo2ego_jax.load_pretrained(path)` opens a converted or exported checkpoint (see `exo2ego_jax.checkpoints`).
"""
__version__ = "0.1.0"


def __getattr__(name):
    # The package root stays free of JAX imports: the data builders' decoding workers import
    # `exo2ego_jax.data` and must not pay for JAX/Orbax. `load_pretrained` is resolved on first use.
    if name == "load_pretrained":
        from exo2ego_jax.checkpoints import load_pretrained
        return load_pretrained
    raise AttributeError(f"module 'exo2ego_jax' has no attribute {name!r}")
