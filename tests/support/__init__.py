"""Test support: fixtures and helpers shared by the test modules (a package, not conftest imports).

``tests/conftest.py`` registers the modules with fixtures as pytest plugins; test modules import
helpers from here by name (``from support.servers import Server``). Nothing in it ships with comfyq.

- ``sim``: the ComfyUI simulator fixtures, a websocket recorder, shape and PNG helpers
- ``servers``: comfyq servers (in the test's loop or a thread of their own) and their fixtures
- ``workflows``: workflows the tests submit
- ``s3``: a real S3-protocol server (moto) and a fault-injecting proxy in front of it
- ``webhooks``: a real webhook receiver and outbox helpers
- ``serve``: any helper aiohttp app (origin, receiver, proxy) on aiohttp's TestServer
- ``client``: workflows and an event log for the ComfyUI client tests
- ``traces``: the recorded ComfyUI traffic (shared/comfyui-protocol)
- ``v2``: the Comfy API v2 contract as JSON Schema, SSE parsing
- ``cluster_harness``: several ``comfyq serve`` processes on one PostgreSQL database, simulators,
  a throwaway PostgreSQL cluster (the cluster tests; bench's cluster and chaos runs import it too)
"""
