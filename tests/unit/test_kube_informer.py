"""The async informer against tests/fake_kube.py: list, watch, resume after a cut, re-list on 410 Gone."""

from __future__ import annotations

import asyncio
from typing import Any

from tensorwasm.kube.informer import Informer
from tests.fake_kube import FakeKube, until

CONFIGMAPS = "/api/v1/namespaces/ns/configmaps"


def test_list_watch_resume_and_relist_on_gone() -> None:
    async def main() -> None:
        fake = await FakeKube().start()
        api = fake.client("test")
        changes: list[tuple[Any, Any]] = []
        informer = Informer("configmaps", api, CONFIGMAPS, lambda old, new: changes.append((old, new)))
        task = asyncio.create_task(informer.run())
        try:
            await fake.put(CONFIGMAPS, {"metadata": {"name": "a"}, "data": {"k": "1"}})
            await asyncio.wait_for(informer.synced.wait(), 30)
            await fake.put(CONFIGMAPS, {"metadata": {"name": "b"}})
            await until(lambda: "b" in informer.items())
            await fake.put(CONFIGMAPS, {"metadata": {"name": "a"}, "data": {"k": "2"}})
            await until(lambda: (informer.get("a") or {}).get("data") == {"k": "2"})
            assert informer.lists == 1 and (None, None) in changes  # one list, then events only
            # History compacted and the stream cut: the resumed watch gets 410 and the informer re-lists.
            await fake.remove(CONFIGMAPS, "b")
            await fake.compact_and_drop_watches()
            await until(lambda: informer.lists == 2)
            assert set(informer.items()) == {"a"}  # the cache is the new list's
            await fake.put(CONFIGMAPS, {"metadata": {"name": "c"}})
            await until(lambda: "c" in informer.items())
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await api.close()
            await fake.stop()

    asyncio.run(main())
