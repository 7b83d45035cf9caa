"""Tenancy: per-tenant configuration, GPU byte caps and bounded invoke queues (pure where possible)."""
