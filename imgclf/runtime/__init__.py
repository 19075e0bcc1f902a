"""Layer 2: the bundle format, the torch and ONNX Runtime engines, predict and TTA."""
