"""Errors the runtime reports to callers, each with a stable `kind` and an HTTP status.

Owns the error vocabulary shared by engine/, accel/, tenancy/, snapshots/ and api/.
The HTTP layer turns any `RuntimeFault` into `{"error": {"kind", "message", ...details}}`.
Must not import wasmtime, cuda or aiohttp.
"""

from __future__ import annotations

from typing import Any, ClassVar


class RuntimeFault(Exception):
    """Base of every error a caller may see; `kind` and `status` are part of the API."""

    kind: ClassVar[str] = "internal"
    status: ClassVar[int] = 500

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_json(self) -> dict[str, Any]:
        return {"error": {"kind": self.kind, "message": self.message, **self.details}}


class BadRequest(RuntimeFault):
    """The request itself is malformed."""

    kind, status = "bad_request", 400


class Unauthenticated(RuntimeFault):
    """No or unknown bearer token."""

    kind, status = "unauthenticated", 401


class Forbidden(RuntimeFault):
    """The token is valid but belongs to another tenant."""

    kind, status = "forbidden", 403


class NotFound(RuntimeFault):
    """Unknown tenant or function."""

    kind, status = "not_found", 404


class PayloadTooLarge(RuntimeFault):
    """Request body over the tenant's limit."""

    kind, status = "payload_too_large", 413


class QueueFull(RuntimeFault):
    """The tenant's bounded queue is full; retry after `retry_after_s`."""

    kind, status = "queue_full", 429


class Overloaded(QueueFull):
    """The shard (not the tenant) is at a limit: in-flight body bytes, or failed authentications
    from this address; retry after `retry_after_s`."""

    kind, status = "overloaded", 429


class RequestTimeout(RuntimeFault):
    """The request body did not arrive within the body read timeout."""

    kind, status = "request_timeout", 408


class DeadlineExceeded(RuntimeFault):
    """The invoke ran past its deadline and was interrupted."""

    kind, status = "deadline_exceeded", 504


class GuestTrap(RuntimeFault):
    """The guest trapped (unreachable, out-of-bounds, stack overflow, ...)."""

    kind, status = "guest_trap", 500


class GuestLimitExceeded(GuestTrap):
    """The guest passed one of its tenant's resource limits (details name `limit` and its value)."""

    kind, status = "guest_limit_exceeded", 500


class GuestMemoryExceeded(RuntimeFault):
    """The guest tried to grow linear memory past its limit."""

    kind, status = "guest_memory_exceeded", 507


class GpuMemoryExhausted(RuntimeFault):
    """A GPU allocation would pass the tenant's cap."""

    kind, status = "gpu_memory_exhausted", 507

    def __init__(self, requested: int, limit: int, current: int) -> None:
        super().__init__(
            f"GPU allocation of {requested} bytes refused: {current} of {limit} bytes in use",
            requested=requested,
            limit=limit,
            current=current,
        )
        self.requested, self.limit, self.current = requested, limit, current


class InvalidKernelLaunch(RuntimeFault):
    """Kernel name, grid/block, shared memory or arguments rejected before the driver saw them."""

    kind, status = "invalid_kernel_launch", 400


class ModuleRejected(RuntimeFault):
    """A tenant's module failed digest, size or validation checks."""

    kind, status = "module_rejected", 422


class TenantNotReady(RuntimeFault):
    """The tenant is assigned but not loaded (yet)."""

    kind, status = "tenant_not_ready", 503


class TenantMoving(RuntimeFault):
    """The tenant is moving to another shard: this shard holds it at the move barrier (or has just
    given it up); retry after `retry_after_s`, by then its new shard serves it."""

    kind, status = "tenant_moving", 503


class SnapshotRejected(RuntimeFault):
    """A snapshot blob failed verification or does not belong to this tenant/module."""

    kind, status = "snapshot_rejected", 422


class AcceleratorFailed(RuntimeFault):
    """The GPU context is poisoned (sticky CUDA error); the shard must restart."""

    kind, status = "accelerator_failed", 503


class RateLimited(QueueFull):
    """The tenant is over its spec.rateLimit (token bucket); retry after `retry_after_s`."""

    kind, status = "rate_limited", 429


class JobsFull(QueueFull):
    """The tenant's async job table is at its bound; retry after `retry_after_s`."""

    kind, status = "jobs_full", 429


class Cancelled(RuntimeFault):
    """The run was cancelled: DELETE on its job, or the streaming client went away."""

    kind, status = "cancelled", 409
