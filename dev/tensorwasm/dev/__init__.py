"""TensorWasm dev."""
