"""Layer 1: the model registry and the architectures."""
