"""The one Kubernetes client of the project (beside kopf's own watching): REST, watches, informers.

`client.KubeApi` (async, aiohttp), `config.load_connection`, `informer.Informer`. Used by the
operator and the runtime shard; must not import either, nor kopf.
"""
