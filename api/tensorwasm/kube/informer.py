"""An async informer: one namespaced kind listed once, then kept current by a watch.

Owns `Informer` (a task body plus a name -> object cache of raw API dicts). It lists with the
resourceVersion the list returned, applies ADDED/MODIFIED/DELETED events, follows BOOKMARKs,
re-watches from the last resourceVersion when a watch ends or drops, and re-lists only when the
API server says the version is gone (410) or `relist_s` has passed. Every change calls
`on_change(old, new)` (None for absent; both None after a re-list: anything may have changed).
Objects in the cache are replaced, never mutated, so readers may keep what `items()` returned.
Runs on the event loop (no threads). Must not import the operator, the runtime or kopf.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

from tensorwasm.kube.client import KubeApi, KubeError

log = logging.getLogger(__name__)

OnChange = Callable[[dict[str, Any] | None, dict[str, Any] | None], None]
WATCH_TIMEOUT_S = 300
RETRY_S = 1.0


class _Gone(Exception):
    """The watch's resourceVersion is too old: re-list."""


class Informer:
    """Cache of one kind in one namespace (a collection path), fed by list + watch."""

    def __init__(
        self,
        kind: str,
        api: KubeApi,
        path: str,
        on_change: OnChange,
        relist_s: float = WATCH_TIMEOUT_S,
        params: Mapping[str, str] | None = None,
    ) -> None:
        self.kind, self.api, self.path, self.on_change = kind, api, path, on_change
        self.relist_s, self.params = relist_s, dict(params or {})
        self.synced = asyncio.Event()  # set after the first successful list
        self.lists = 0  # full lists made (a restart-free run makes 1 per relist_s)
        self._objects: dict[str, dict[str, Any]] = {}

    def items(self) -> dict[str, dict[str, Any]]:
        """A copy of the cache (name -> object); the objects themselves are shared, read-only."""
        return dict(self._objects)

    def get(self, name: str) -> dict[str, Any] | None:
        return self._objects.get(name)

    async def run(self) -> None:
        """List and watch until cancelled."""
        while True:
            try:
                version = await self._list()
                await self._watch_until_relist(version)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # API server away, RBAC, bad response: list again shortly
                log.warning("Failed listing %s, retrying: %s", self.kind, exc)
                await asyncio.sleep(RETRY_S)

    async def _list(self) -> str:
        items, version = await self.api.list_versioned(self.path, self.params)
        self._objects = {str(o["metadata"]["name"]): o for o in items}
        self.lists += 1
        self.synced.set()
        self.on_change(None, None)
        return version

    async def _watch_until_relist(self, version: str) -> None:
        relist_at = time.monotonic() + self.relist_s
        while True:
            remaining = relist_at - time.monotonic()
            if remaining <= 1:
                return
            try:
                async for event in self.api.watch(
                    self.path, version, int(min(remaining, WATCH_TIMEOUT_S)), self.params
                ):
                    version = self._apply(event, version)
            except _Gone:
                log.info("Re-listing %s: watch version expired", self.kind)
                return
            except KubeError as exc:
                if exc.status == 410:
                    return
                raise
            except (
                aiohttp.ClientError,
                OSError,
                TimeoutError,
                ValueError,
            ) as exc:  # dropped: resume where it was
                log.debug("Restarting %s watch: %s", self.kind, exc)
                await asyncio.sleep(RETRY_S)

    def _apply(self, event: Mapping[str, Any], version: str) -> str:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise _Gone()
            raise RuntimeError(f"watch error {obj.get('code')}: {obj.get('message')}")
        meta = obj.get("metadata") or {}
        version = str(meta.get("resourceVersion") or version)
        if kind == "BOOKMARK":
            return version
        name = str(meta.get("name", ""))
        old = self._objects.get(name)
        if kind == "DELETED":
            self._objects.pop(name, None)
        else:
            self._objects[name] = obj
        self.on_change(old, None if kind == "DELETED" else obj)
        return version
