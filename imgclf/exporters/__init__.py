"""Layer 3: export to ONNX, int8 ONNX, TorchScript, Core ML and TFLite."""
