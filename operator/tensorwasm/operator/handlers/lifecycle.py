"""Operator start-up, login and clean-up handlers.

Owns kopf's own settings for this operator and the Reconciler's creation (kept in kopf's memo).
Must not build objects or decide placement.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

import kopf

from tensorwasm.api.group import FINALIZER, GROUP
from tensorwasm.kube.client import connect
from tensorwasm.kube.config import SERVICE_ACCOUNT, in_cluster, in_cluster_available
from tensorwasm.operator import health
from tensorwasm.operator.reconciler import Reconciler
from tensorwasm.operator.settings import FIELD_MANAGER, OperatorSettings

FieldSpec = str | tuple[str, ...] | list[str] | None

log = logging.getLogger("tensorwasm.operator")


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings) -> None:
    @kopf.on.login(registry=registry, id="operator-login")
    def operator_login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # The same order as tensorwasm.kube.config.load_connection, so the watch and our writes
        # use one identity. In a pod, the API server's address comes from $KUBERNETES_SERVICE_HOST
        # as client-go does: kopf's own service-account login dials kubernetes.default.svc, which
        # needs cluster DNS (a cluster without it would never get past login).
        if in_cluster_available(os.environ):
            conn = in_cluster(os.environ)
            return kopf.ConnectionInfo(
                server=conn.server,
                ca_path=str(SERVICE_ACCOUNT / "ca.crt"),
                scheme="Bearer",
                token=(SERVICE_ACCOUNT / "token").read_text().strip(),
                default_namespace=(SERVICE_ACCOUNT / "namespace").read_text().strip(),
            )
        return kopf.login_with_kubeconfig(**kwargs)

    @kopf.on.startup(registry=registry, id="operator-startup", backoff=2.0)
    async def operator_startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        configure_kopf(settings)
        reconciler = Reconciler(operator_settings, await connect(FIELD_MANAGER))
        await reconciler.start()
        memo["reconciler"] = reconciler
        health.READINESS.listed = True  # /readyz: every placement is known, reconciles may run

    @kopf.on.cleanup(registry=registry, id="operator-cleanup")
    async def operator_cleanup(memo: kopf.Memo, **_: Any) -> None:
        reconciler: Reconciler | None = memo.get("reconciler")
        if reconciler is not None:
            await reconciler.api.close()
            log.info("Stopped writes=%s", dict(reconciler.api.writes))

    operator_settings = settings


class NoDiffBase(kopf.DiffBaseStorage):
    """No diff base: only on-change handlers use one, and kopf builds it (a deep copy of the
    body) for every watch event; this operator has event handlers only."""

    def build(self, *, body: kopf.Body, extra_fields: Iterable[FieldSpec] | None = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


def configure_kopf(settings: kopf.OperatorSettings) -> None:
    # Our Events are posted by the reconciler on phase changes; kopf's per-handler ones are noise.
    settings.posting.enabled = False
    # Our finalizer (FINALIZER) is managed by the reconciler; kopf removes its own marker whenever
    # no kopf handler needs it, so the two must never share a name.
    assert settings.persistence.finalizer != FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = NoDiffBase()
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 30
    settings.scanning.disabled = True
