"""marlin_jax: MARLIN, the masked autoencoder for facial video representation learning, in JAX/Flax."""

from marlin_jax.architectures import MarlinArchitecture
from marlin_jax.marlin import Marlin

__all__ = ["Marlin", "MarlinArchitecture"]
__version__ = "0.1.0"
