"""TensorWasm operator."""
