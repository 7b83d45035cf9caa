"""Tenant sources: where a shard learns which tenants it serves (local YAML file or Kubernetes)."""
