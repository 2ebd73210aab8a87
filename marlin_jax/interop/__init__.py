"""Moving weights between this project and the official PyTorch MARLIN (and VideoMAE)."""

from marlin_jax.interop.state_dict import export_state_dict, import_state_dict

__all__ = ["export_state_dict", "import_state_dict"]
