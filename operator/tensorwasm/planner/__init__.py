"""TensorWasm planner."""
