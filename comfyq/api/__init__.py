"""HTTP routes (the contract in ../shared/spec/CONTRACT.md)."""

from __future__ import annotations

from aiohttp import web


def setup_routes(app: web.Application) -> None:
    """Register every route on ``app``."""
    from comfyq.api import health

    health.setup(app)
