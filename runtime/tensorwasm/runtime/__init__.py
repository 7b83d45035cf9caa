"""TensorWasm runtime shard: hosts many tenants' wasm functions in one process."""
