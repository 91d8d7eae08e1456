"""Fuzz the typed workflow routes: schemathesis generates bodies (valid and invalid) from each
modifier's schema in the served document (``/workflows/{name}`` and ``/sync``); no answer may be
a 5xx. Valid ones run on the simulator, so a schema that admits what a modifier cannot build
shows up here too."""

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

from comfyq.api.context import ApiOptions
from comfyq.app import build_document
from modifiers import ModifierRegistry

MAX_EXAMPLES = 20  # per operation


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadServer]:
    root: Path = tmp_path_factory.mktemp("fuzz-workflows")
    srv = ThreadServer(root, ApiOptions(heartbeat=0.5), max_queue_size=100_000).start()
    try:
        yield srv
    finally:
        srv.stop()


# The document a server with the bundled modifiers serves (test_api_http checks that it is the
# one served), restricted to the workflow routes: the others are fuzzed by test_api_fuzz.
_doc = json.loads(msgspec.json.encode(build_document(ModifierRegistry(), api_keys=False)))
_doc["paths"] = {p: ops for p, ops in _doc["paths"].items() if p.startswith("/workflows/")}
schema = schemathesis.openapi.from_dict(_doc)


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
def test_no_workflow_request_makes_a_5xx(case: Any, fuzz_server: ThreadServer) -> None:
    sent = json.dumps(case.body, default=str) if case.body is not None else ""
    if "://" in sent or "://" in json.dumps(case.query or {}, default=str):
        return  # never make the server fetch or call anything
    if case.query and "timeout" in case.query:
        case.query["timeout"] = 0  # /sync: answer at once, the job goes on
    case.call_and_validate(base_url=fuzz_server.url, timeout=60, checks=[not_a_server_error])
