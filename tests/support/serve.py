"""Helper HTTP servers (origins, receivers, proxies): any aiohttp app on aiohttp's TestServer.

Only comfyq itself runs on its production runner (``support.servers``); everything it talks to in
the tests is one of these.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.test_utils import TestServer


async def start(app: web.Application, *, host: str = "127.0.0.1", port: int = 0) -> TestServer:
    """``app`` listening on ``host`` (a free port unless ``port`` is given), started. Requests
    still running when it closes are cut off after 0.2 s (a receiver may be told to hang)."""
    server = TestServer(app, host=host, port=port)
    await server.start_server(shutdown_timeout=0.2, access_log=None)
    return server


def base_url(server: TestServer) -> str:
    """``http://host:port`` of a started server, without a trailing slash."""
    return str(server.make_url("/")).rstrip("/")
