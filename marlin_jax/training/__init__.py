"""MARLIN pretraining: schedules, losses, the pure train step, sharding, checkpoints and the loop."""
