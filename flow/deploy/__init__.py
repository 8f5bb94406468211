"""A fitted run on new images: predict (PyTorch or ONNX Runtime) and ONNX export."""
