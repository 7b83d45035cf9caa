"""TensorWasm cli."""
