"""Execution order and cache keys, following ComfyUI's ExecutionList and input-signature cache."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from .nodedefs import NODES


def is_link(value: Any) -> bool:
    """ComfyUI's definition of a link: [str node_id, int|float slot]."""
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], (int, float))
    )


class ExecList:
    """Topological dissolve of the graph with ComfyUI's UX-friendly pick of the next node."""

    def __init__(self, prompt: dict[str, Any], is_cached: Callable[[str], bool]) -> None:
        self.prompt = prompt
        self.is_cached = is_cached
        self.pending: dict[str, bool] = {}
        self.block_count: dict[str, int] = {}
        self.blocking: dict[str, dict[str, dict[Any, bool]]] = {}

    def add_node(self, node_id: str) -> None:
        """Add a node and every uncached ancestor (depth first, last input first)."""
        stack = [node_id]
        links: list[tuple[str, Any, str]] = []
        while stack:
            nid = stack.pop()
            if nid in self.pending:
                continue
            self.pending[nid] = True
            self.block_count[nid] = 0
            self.blocking[nid] = {}
            for value in self.prompt[nid]["inputs"].values():
                if is_link(value) and not self.is_cached(value[0]):
                    stack.append(value[0])
                    links.append((value[0], value[1], nid))
        for src, slot, dst in links:
            self._strong_link(src, slot, dst)

    def _strong_link(self, src: str, slot: Any, dst: str) -> None:
        if self.is_cached(src):
            return
        self.add_node(src)
        if dst not in self.blocking[src]:
            self.blocking[src][dst] = {}
            self.block_count[dst] += 1
        self.blocking[src][dst][slot] = True

    def is_empty(self) -> bool:
        """True when every added node has completed."""
        return not self.pending

    def _is_output(self, node_id: str) -> bool:
        return NODES[self.prompt[node_id]["class_type"]].output_node

    def stage(self) -> str | None:
        """Next node to run, or None when the remaining nodes form a cycle."""
        ready = [nid for nid in self.pending if self.block_count[nid] == 0]
        if not ready:
            return None
        # Output nodes first so previews show early; then nodes feeding an output directly,
        # then at distance two; else the oldest ready node.
        for nid in ready:
            if self._is_output(nid):
                return nid
        for nid in ready:
            if any(self._is_output(b) for b in self.blocking[nid]):
                return nid
        for nid in ready:
            for b in self.blocking[nid]:
                if any(self._is_output(b1) for b1 in self.blocking[b]):
                    return nid
        return ready[0]

    def complete(self, node_id: str) -> None:
        """Mark a staged node done and unblock its dependants."""
        del self.pending[node_id]
        for dst in self.blocking[node_id]:
            self.block_count[dst] -= 1
        del self.blocking[node_id]

    def cycle_nodes(self) -> list[str]:
        """Nodes left when no node is ready (for the DependencyCycleError report)."""
        return list(self.pending)


class _Unequal:
    """A cache key part that equals nothing (ComfyUI's NaN for unhashable or missing nodes)."""


def signatures(prompt: dict[str, Any], changed: dict[str, Any]) -> dict[str, Any]:
    """Cache key of every node: class, IS_CHANGED value, constant inputs and ancestors' keys."""
    keys: dict[str, Any] = {}
    visiting: set[str] = set()

    def key_of(nid: str) -> Any:
        if nid in keys:
            return keys[nid]
        node = prompt.get(nid)
        if (
            not isinstance(node, dict)
            or nid in visiting
            or node.get("class_type") not in NODES
            or isinstance(changed.get(nid), _Unequal)
        ):
            return _Unequal()
        visiting.add(nid)
        # The parts as Python literals joined by "|": class, IS_CHANGED value (a quoted repr),
        # [node id,] then each input by name, 'name'=value for a constant or
        # 'name':<upstream key>:slot for a link. Every part is self-delimiting (a literal, or a
        # hex digest), so equal texts mean equal parts, as with the repr of a parts list, built
        # without the tuples and nested reprs.
        class_type = node["class_type"]
        parts = [repr(class_type), repr(repr(changed.get(nid, False)))]
        if NODES[class_type].unique_id_in_signature:
            parts.append(repr(nid))
        raw_inputs = node.get("inputs")
        unequal = not isinstance(raw_inputs, dict)
        inputs: dict[str, Any] = raw_inputs if isinstance(raw_inputs, dict) else {}
        for name in sorted(inputs):
            value = inputs[name]
            if is_link(value):
                upstream = key_of(value[0])
                if isinstance(upstream, _Unequal):
                    unequal = True
                    continue
                parts.append(f"{name!r}:{upstream}:{value[1]!r}")
            else:
                parts.append(f"{name!r}={value!r}")
        visiting.discard(nid)
        # A digest keeps keys short and shallow, whatever the graph's depth.
        keys[nid] = (
            _Unequal()
            if unequal
            else hashlib.blake2b("|".join(parts).encode(), digest_size=16).hexdigest()
        )
        return keys[nid]

    for nid in prompt:
        key_of(nid)
    return keys
