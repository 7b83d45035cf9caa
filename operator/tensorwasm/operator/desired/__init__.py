"""Pure builders of the Kubernetes objects the operator owns: `build_*(...) -> dict`.

No I/O, no kopf, no clock: unit-tested by equality.
"""
