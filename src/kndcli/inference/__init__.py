"""Bundle loading and the Predictor: ONNX Runtime by default, no training stack imported."""
