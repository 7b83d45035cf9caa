"""A minimal informer: one namespaced kind listed once, then kept current by a watch.

Owns `Informer` (a worker-thread body plus a name -> object cache of raw API dicts). It lists with
the resourceVersion the list returned, applies ADDED/MODIFIED/DELETED events, follows BOOKMARKs,
re-watches from the last resourceVersion when a watch ends or drops, and re-lists only when the
API server says the version is gone (410) or `relist_s` has passed. Every change calls
`on_change(old, new)` (None for absent; both None after a re-list: anything may have changed).
Objects in the cache are replaced, never mutated, so readers may keep what `items()` returned.
The `kubernetes` client is blocking: this runs in its own thread. Must not import the runtime.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger(__name__)

OnChange = Callable[[dict[str, Any] | None, dict[str, Any] | None], None]
_WATCH_TIMEOUT_S = 300
_RETRY_S = 1.0


class _Gone(Exception):
    """The watch's resourceVersion is too old: re-list."""


class Informer:
    """Cache of one kind in one namespace, fed by list + watch (run `run` in a thread)."""

    def __init__(
        self,
        kind: str,
        list_fn: Callable[..., Any],
        args: tuple[str, ...],
        on_change: OnChange,
        stop: threading.Event,
        relist_s: float = _WATCH_TIMEOUT_S,
        selectors: Mapping[str, str] | None = None,
    ) -> None:
        self.kind, self.list_fn, self.args, self.on_change = kind, list_fn, args, on_change
        self.stop, self.relist_s, self.selectors = stop, relist_s, dict(selectors or {})
        self.synced = threading.Event()  # set after the first successful list
        self.lists = 0  # full lists made (a restart-free run makes 1 per relist_s)
        self._objects: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def items(self) -> dict[str, dict[str, Any]]:
        """A copy of the cache (name -> object); the objects themselves are shared, read-only."""
        with self._lock:
            return dict(self._objects)

    def get(self, name: str) -> dict[str, Any] | None:
        with self._lock:
            return self._objects.get(name)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                version = self._list()
                self._watch_until_relist(version)
            except Exception as exc:  # API server away, RBAC, bad response: list again shortly
                log.warning("Failed listing %s, retrying: %s", self.kind, exc)
                self.stop.wait(_RETRY_S)

    def _call(self, **kwargs: Any) -> Any:
        return self.list_fn(*self.args, _preload_content=False, **self.selectors, **kwargs)

    def _list(self) -> str:
        resp = self._call()
        body = json.loads(resp.data)
        fresh = {str(o["metadata"]["name"]): o for o in body.get("items") or []}
        with self._lock:
            self._objects = fresh
        self.lists += 1
        self.synced.set()
        self.on_change(None, None)
        return str((body.get("metadata") or {}).get("resourceVersion") or "")

    def _watch_until_relist(self, version: str) -> None:
        relist_at = time.monotonic() + self.relist_s
        while not self.stop.is_set():
            remaining = relist_at - time.monotonic()
            if remaining <= 1:
                return
            try:
                version = self._watch(version, min(remaining, _WATCH_TIMEOUT_S))
            except _Gone:
                log.info("Re-listing %s: watch version expired", self.kind)
                return
            except Exception as exc:  # a dropped connection: re-watch from the last version seen
                log.debug("Restarting %s watch: %s", self.kind, exc)
                self.stop.wait(_RETRY_S)

    def _watch(self, version: str, timeout_s: float) -> str:
        from kubernetes.watch.watch import iter_resp_lines

        resp = self._call(
            watch=True,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=max(1, int(timeout_s)),
            _request_timeout=(10, timeout_s + 30),
        )
        try:
            for line in iter_resp_lines(resp):  # type: ignore[no-untyped-call]
                if self.stop.is_set():
                    break
                if line:
                    version = self._apply(json.loads(line), version)
        finally:
            resp.close()
            resp.release_conn()
        return version

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
        with self._lock:
            old = self._objects.get(name)
            if kind == "DELETED":
                self._objects.pop(name, None)
            else:
                self._objects[name] = obj
        self.on_change(old, None if kind == "DELETED" else obj)
        return version
