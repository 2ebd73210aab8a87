"""Labelled downstream tasks on MARLIN features and encoders: task files (CSV, CelebV-HQ), linear probes and
fine-tuning on the training harness."""
