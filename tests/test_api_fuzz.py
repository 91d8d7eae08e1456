"""Fuzz: schemathesis generates requests (valid and invalid) for every operation of our OpenAPI
document, and no answer may be a 5xx.

Jobs that the fuzzer manages to get accepted run on the simulator; their workflows are random, so
ComfyUI rejects them (a 400 for sync). Bodies that contain a URL are not sent: the server would try
to fetch or call it, and tests reach only loopback addresses.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error
from support.servers import ThreadServer

from comfyq.api import ROUTES
from comfyq.api.context import ApiOptions
from comfyq.api.openapi import document

MAX_EXAMPLES = 25  # per operation: the whole run stays around half a minute


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadServer]:
    root: Path = tmp_path_factory.mktemp("fuzz")
    srv = ThreadServer(
        root, ApiOptions(heartbeat=0.5, cancel_wait=1.0), max_queue_size=100_000
    ).start()
    try:
        yield srv
    finally:
        srv.stop()


# The document the server serves at /openapi.json, byte for byte (test_api_http checks that);
# built here so that the operations are known when tests are collected.
schema = schemathesis.openapi.from_dict(
    json.loads(msgspec.json.encode(document(ROUTES, api_keys=False)))
)


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
def test_no_request_makes_a_5xx(case: Any, fuzz_server: ThreadServer) -> None:
    sent = json.dumps(case.body, default=str) if case.body is not None else ""
    if "://" in sent or "://" in json.dumps(case.query or {}, default=str):
        return  # never make the server fetch or call anything
    case.call_and_validate(base_url=fuzz_server.url, timeout=30, checks=[not_a_server_error])
