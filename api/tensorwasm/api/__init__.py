"""The TensorWasm resource API: the one home of the Tenant and Snapshot vocabulary.

Owns group/version/kinds (`group`), derived object names (`names`), byte quantities (`quantity`),
the declarative spec models with their defaults and bounds (`fields`, `tenant`, `snapshot`), status
conditions maths (`conditions`), RFC 3339 stamps (`stamps`) and the CRDs generated from the models
(`crd`). The operator, the runtime, the planner and the CLI import it; it imports none of them.
Pure: standard library only (PyYAML only in `crd`'s command line).
"""
