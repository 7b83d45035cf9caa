"""Snapshots: the v1 blob codec (pure), the atomic content-addressed store, capture and restore."""
