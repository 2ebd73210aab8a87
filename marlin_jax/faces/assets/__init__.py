"""MediaPipe model files shipped as package data (provenance, licence and hashes: SOURCE.md)."""
