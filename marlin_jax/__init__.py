"""marlin_jax: MARLIN, the masked autoencoder for facial video representation learning, in JAX/Flax."""

from marlin_jax.architectures import MarlinArchitecture

__all__ = ["Marlin", "MarlinArchitecture"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: `Marlin` brings orbax, PyAV and ml_collections, which the model and training modules do not need.
    if name == "Marlin":
        from marlin_jax.marlin import Marlin
        return Marlin
    raise AttributeError(f"module 'marlin_jax' has no attribute {name!r}")
