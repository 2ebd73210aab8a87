"""MARLIN pretraining on the training harness: the masked-autoencoder step, its losses and state, and the
evaluators that watch it learn (validation reconstruction, in-training linear probes)."""
