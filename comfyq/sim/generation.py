"""Which ComfyUI the simulator speaks: 0.3.64 (the recorded traffic) or the newest read (0.38.1).

Every difference listed in ``shared/comfyui-protocol/NEWER.md`` is one switch here, read by the
HTTP, websocket, queue and executor code; nothing else in the simulator knows version numbers.
"""

from __future__ import annotations

import random
import re
import sys
from dataclasses import dataclass
from typing import Any

OLD = "0.3.64"
NEW = "0.38"
NEWEST = NEW
VERSIONS = (OLD, NEW)

# Nodes the newer ComfyUI marks has_intermediate_output: served from cache they send `executed`
# again just before execution_success (so one prompt may carry two for the same node and file).
INTERMEDIATE_OUTPUT = frozenset({"PreviewImage"})

_OLD_FEATURES: dict[str, Any] = {"supports_preview_metadata": True, "max_upload_size": 104857600}


@dataclass(frozen=True)
class Generation:
    """The protocol switches of one ComfyUI generation (plus the assets toggle of the new one)."""

    name: str
    comfyui_version: str
    jobs_api: bool  # /api/jobs, /api/jobs/{id}, both cancel routes, /node_replacements
    strict_prompt_ids: bool  # a client prompt_id must be a canonical lowercase UUID
    create_time: bool  # extra_data.create_time stamped by the server
    hide_secrets_in_queue: bool  # auth_token_comfy_org / api_key_comfy_org never in /queue
    missing_node_type: bool  # the unknown-class error type and shape
    dependency_cycle: bool  # cycles refused at validation instead of failing at run time
    modern_view: bool  # /view: more dangerous types, attachment, nosniff, Sec-Fetch-Dest
    modern_stats: bool  # /system_stats: os from sys.platform, new keys, every device
    rich_executed: bool  # executed entries carry metadata (and ids with assets); cached re-emit
    assets: bool  # assets system on (new generation only; --disable-assets turns it off)

    @property
    def features(self) -> dict[str, Any]:
        """``GET /features`` and the websocket ``feature_flags`` reply."""
        if self.name == OLD:
            return dict(_OLD_FEATURES)
        return {
            **_OLD_FEATURES,
            "supports_model_type_tags": True,
            "extension": {"manager": {"supports_v4": True}},
            "node_replacements": True,
            "assets": self.assets,
        }

    def system(self, base: dict[str, Any]) -> dict[str, Any]:
        """``system`` of ``/system_stats`` from the 0.3.64 shape."""
        system = {**base, "comfyui_version": self.comfyui_version}
        if self.modern_stats:
            system["os"] = sys.platform
            system["comfy_package_versions"] = [
                {"name": "comfyui-frontend-package", "installed": "1.33.4", "required": "1.33.4"}
            ]
            system["deploy_environment"] = "local-git"
        return system


def generation(name: str = NEWEST, *, assets: bool = True) -> Generation:
    """The switches for ``name`` (``0.3.64`` or ``0.38``); ValueError for any other."""
    if name not in (OLD, NEW, "0.38.1"):
        raise ValueError(
            f"unknown ComfyUI generation {name!r}; choose one of {', '.join(VERSIONS)}"
        )
    new = name != OLD
    return Generation(
        name=NEW if new else OLD,
        comfyui_version="0.38.1" if new else "0.3.64",
        jobs_api=new,
        strict_prompt_ids=new,
        create_time=new,
        hide_secrets_in_queue=new,
        missing_node_type=new,
        dependency_cycle=new,
        modern_view=new,
        modern_stats=new,
        rich_executed=new,
        assets=new and assets,
    )


def modern_object_info(name: str, info: dict[str, Any]) -> dict[str, Any]:
    """A node's ``/object_info`` entry with the newer per-node keys."""
    return {
        **info,
        "is_input_list": False,
        "has_intermediate_output": name in INTERMEDIATE_OUTPUT,
        "search_aliases": [],
        "dev_only": False,
    }


# str(uuid.UUID(value)) == value holds exactly for 36 lowercase hex digits and hyphens in the
# 8-4-4-4-12 layout (UUID() accepts other spellings, but str() always writes this one); the
# pattern decides the same without building a UUID object (tested against that definition).
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def is_canonical_uuid(value: Any) -> bool:
    """The newer server's prompt and job id rule: a string equal to its canonical UUID form."""
    return isinstance(value, str) and _CANONICAL_UUID.fullmatch(value) is not None


_random = random.Random()  # seeded from os.urandom once
_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_UUID4_SET = (4 << 76) | (0x8000 << 48)


def uuid4_text() -> str:
    """str(uuid.uuid4()) in form (version 4, RFC 4122 variant), from a PRNG instead of one
    os.urandom call and a UUID object per id: the simulator makes one or two per job."""
    h = f"{_random.getrandbits(128) & _UUID4_CLEAR | _UUID4_SET:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


INVALID_PROMPT_ID = {
    "error": {
        "type": "invalid_prompt_id",
        "message": "prompt_id must be a valid UUID",
        "details": "prompt_id must be a UUID string in canonical lowercase hyphenated form; "
        "omit it to let the server generate one",
        "extra_info": {},
    },
    "node_errors": {},
}


def modern_error(error: dict[str, Any], prompt: Any) -> dict[str, Any]:
    """0.3.64's ``invalid_prompt`` (unknown class, missing class_type) as ``missing_node_type``."""
    if error.get("type") != "invalid_prompt":
        return error
    details = str(error.get("details") or "")
    nid = details.removeprefix("Node ID '#").removesuffix("'")
    node = prompt.get(nid) if isinstance(prompt, dict) else None
    node = node if isinstance(node, dict) else {}
    meta = node.get("_meta")
    title = meta.get("title") if isinstance(meta, dict) else None
    title = title if isinstance(title, str) and title else None
    if "class_type" not in node:
        return {
            "type": "missing_node_type",
            "message": f"Node '{title or f'ID #{nid}'}' has no class_type. The workflow may be "
            "corrupted or a custom node is missing.",
            "details": details,
            "extra_info": {"node_id": nid, "class_type": None, "node_title": title},
        }
    class_type = node["class_type"]
    shown = title or str(class_type)
    return {
        "type": "missing_node_type",
        "message": f"Node '{shown}' not found. The custom node may not be installed.",
        "details": details,
        "extra_info": {"node_id": nid, "class_type": class_type, "node_title": shown},
    }


def _acyclic(prompt: dict[str, Any], outputs: list[str]) -> bool:
    """True when no link cycle is reachable from ``outputs`` (the links dependency_cycles
    follows); one iterative walk, nothing built but the visited set."""
    done: set[str] = set()
    for out in outputs:
        if out in done:
            continue
        on_path = {out}
        stack = [(out, iter(_link_sources(prompt, out)))]
        while stack:
            nid, ups = stack[-1]
            for up in ups:
                if up in on_path:
                    return False
                if up not in done:
                    on_path.add(up)
                    stack.append((up, iter(_link_sources(prompt, up))))
                    break
            else:
                stack.pop()
                on_path.discard(nid)
                done.add(nid)
    return True


def _link_sources(prompt: dict[str, Any], nid: str) -> list[str]:
    node = prompt.get(nid)
    inputs = node.get("inputs") if isinstance(node, dict) else None
    if not isinstance(inputs, dict):
        return []
    return [
        str(v[0])
        for v in inputs.values()
        if isinstance(v, list) and len(v) == 2 and str(v[0]) in prompt
    ]


def dependency_cycles(prompt: dict[str, Any], outputs: list[str]) -> dict[str, Any]:
    """``node_errors`` for every node on a link cycle reachable from ``outputs`` (newer ComfyUI
    refuses these at validation; 0.3.64 failed them at run time)."""
    if _acyclic(prompt, outputs):  # every accepted prompt: no error bookkeeping at all
        return {}
    errors: dict[str, Any] = {}
    state: dict[str, int] = {}  # 1 = on the path, 2 = done
    path: list[str] = []

    def links(nid: str) -> list[str]:
        node = prompt.get(nid)
        inputs = node.get("inputs") if isinstance(node, dict) else None
        found = []
        for value in (inputs or {}).values() if isinstance(inputs, dict) else []:
            if isinstance(value, list) and len(value) == 2 and str(value[0]) in prompt:
                found.append(str(value[0]))
        return found

    def title(nid: str) -> str:
        node = prompt.get(nid)
        return f"{nid} ({node.get('class_type') if isinstance(node, dict) else '?'})"

    def visit(nid: str) -> None:
        state[nid] = 1
        path.append(nid)
        for up in links(nid):
            if state.get(up) == 1:
                cycle = path[path.index(up) :]
                text = " -> ".join(title(n) for n in [*cycle, up])
                for member in cycle:
                    node = prompt.get(member)
                    errors.setdefault(
                        member,
                        {
                            "errors": [
                                {
                                    "type": "dependency_cycle",
                                    "message": "Dependency cycle detected",
                                    "details": text,
                                    "extra_info": {"node_id": member, "cycle_nodes": list(cycle)},
                                }
                            ],
                            "dependent_outputs": [],
                            "class_type": node.get("class_type")
                            if isinstance(node, dict)
                            else None,
                        },
                    )
            elif up not in state:
                visit(up)
        path.pop()
        state[nid] = 2

    for out in outputs:
        if out not in state:
            visit(out)
    for out in outputs:  # every output that reaches a cycle depends on it
        seen, todo = {out}, [out]
        while todo:
            for up in links(todo.pop()):
                if up not in seen:
                    seen.add(up)
                    todo.append(up)
        for nid in seen & set(errors):
            errors[nid]["dependent_outputs"].append(out)
    return errors


def replace_nodes(prompt: Any, table: dict[str, Any], installed: Any) -> None:
    """Newer ComfyUI's node replacement, in place: a node whose class is not installed but has a
    registered replacement gets the new class, inputs rebuilt from ``input_mapping``
    (``{new_id, old_id}`` or ``{new_id, set_value}``), and the links out of it re-indexed by
    ``output_mapping`` (``{old_idx, new_idx}``); node ids are kept.

    ``table`` maps an old class to its replacements: ``[{"new_node_id": class, "input_mapping":
    [...], "output_mapping": [...]}]`` (the first whose class is installed is used)."""
    if not isinstance(prompt, dict) or not table:
        return
    moved: dict[str, dict[int, int]] = {}
    for nid, node in prompt.items():
        old = node.get("class_type") if isinstance(node, dict) else None
        if not isinstance(old, str) or old in installed or old not in table:
            continue
        choice = next(
            (r for r in table[old] if isinstance(r, dict) and r.get("new_node_id") in installed),
            None,
        )
        if choice is None:
            continue
        inputs = node.get("inputs") if isinstance(node.get("inputs"), dict) else {}
        rebuilt: dict[str, Any] = {}
        for m in choice.get("input_mapping") or []:
            if "set_value" in m:
                rebuilt[m["new_id"]] = m["set_value"]
            elif m.get("old_id") in inputs:
                rebuilt[m["new_id"]] = inputs[m["old_id"]]
        node["class_type"], node["inputs"] = choice["new_node_id"], rebuilt
        moved[str(nid)] = {
            int(m["old_idx"]): int(m["new_idx"]) for m in choice.get("output_mapping") or []
        }
    for node in prompt.values():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if not isinstance(inputs, dict):
            continue
        for name, value in inputs.items():
            if (
                isinstance(value, list)
                and len(value) == 2
                and str(value[0]) in moved
                and isinstance(value[1], int)
            ):
                inputs[name] = [value[0], moved[str(value[0])].get(value[1], value[1])]
