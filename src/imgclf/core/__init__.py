"""The torch-free core: settings, errors, events and the stop token, preprocessing, model.json,
numeric helpers and the run folder's names. Everything else builds on it; it imports nothing of
imgclf above it and no PyTorch, so the ONNX predictor and the service's front can use it."""

__version__ = "0.1.0"
