"""Downstream evaluation of MARLIN features (linear probes on extracted `.npy` features)."""
