"""A trained run in production: predict (new images through the run's exact extractor and head), export (ONNX or
TorchScript), server (HTTP), config (what predict and serve were asked).
"""
