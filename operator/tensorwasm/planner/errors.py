"""The planner's one error: an input that is missing, negative, unit-less or absurd.

Owns `PlanInputError`, which always names the offending field so the CLI (and the operator, when it
feeds Helm values through the planner) can say exactly what to fix. Must not import anything else
from the project.
"""

from __future__ import annotations


class PlanInputError(ValueError):
    """A planner input is invalid; `field` names it the way the user wrote it (flag or YAML key)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem
