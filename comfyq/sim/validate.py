"""POST /prompt validation, reproducing ComfyUI 0.3.64's error types, messages and quirks."""

from __future__ import annotations

import os
from typing import Any

from .env import SimEnv
from .nodedefs import NODES, resolve_input
from .types import NodeSpec

Error = dict[str, Any]
Verdict = tuple[bool, list[Error], str]

_TB_PROMPT = (
    '  File "/opt/ComfyUI/execution.py", line 1010, in validate_prompt\n'
    "    m = await validate_inputs(prompt_id, prompt, o, validated)\n"
    "        ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
)
_TB_INNER = (
    '  File "/opt/ComfyUI/execution.py", line 805, in validate_inputs\n'
    "    r = await validate_inputs(prompt_id, prompt, o_id, validated)\n"
    "        ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
)
# The line each failure site points at in ComfyUI's validate_inputs (what its tracebacks show).
_SITES = {
    "inputs": (
        729,
        "inputs = prompt[unique_id]['inputs']",
        "             ~~~~~~~~~~~~~~~~~^^^^^^^^^^",
    ),
    "link": (788, "o_class_type = prompt[o_id]['class_type']", "                   ~~~~~~^^^^^^"),
    "slot": (790, "received_type = r[val[1]]", "                    ~^^^^^^^^"),
    "other": (830, "val = inputs[x]", "          ~~~~~~^^^"),
}


class ServerCrash(TypeError):
    """ComfyUI would raise out of the request handler here: the client gets aiohttp's 500."""


def _full_type_name(ex: BaseException) -> str:
    mod = type(ex).__module__
    return type(ex).__qualname__ if mod == "builtins" else f"{mod}.{type(ex).__qualname__}"


def _frame(site: str) -> str:
    line, code, marks = _SITES[site]
    return (
        f'  File "/opt/ComfyUI/execution.py", line {line}, in validate_inputs\n'
        f"    {code}\n{marks}\n"
    )


_SPECS: dict[str, tuple[NodeSpec, tuple[tuple[str, Any, str], ...]]] = {}


def _input_specs(spec: NodeSpec) -> tuple[tuple[str, Any, str], ...]:
    """(input name, raw spec, "required"/"optional") of a node class, built once per class."""
    hit = _SPECS.get(spec.name)
    if hit is None or hit[0] is not spec:
        listed = [(x, s, "required") for x, s in spec.required.items()]
        listed += [(x, s, "optional") for x, s in spec.optional.items()]
        hit = _SPECS[spec.name] = (spec, tuple(listed))
    return hit[1]


class _Validator:
    def __init__(self, prompt: dict[str, Any], env: SimEnv) -> None:
        self.prompt = prompt
        self.env = env
        self.validated: dict[str, Verdict] = {}
        self.site = "other"  # failure site for the traceback of an exception escaping a node

    def node(self, nid: str) -> Verdict:
        if nid in self.validated:
            return self.validated[nid]
        self.site = "inputs"
        inputs = self.prompt[nid]["inputs"]
        self.site = "other"
        spec: NodeSpec = NODES[self.prompt[nid]["class_type"]]
        errors: list[Error] = []
        valid = True
        for x, raw_spec, category in _input_specs(spec):
            if x not in inputs:
                if category == "required":
                    errors.append(
                        {
                            "type": "required_input_missing",
                            "message": "Required input is missing",
                            "details": f"{x}",
                            "extra_info": {"input_name": x},
                        }
                    )
                continue
            ispec = resolve_input(raw_spec, self.env)
            input_type = ispec[0]
            extra: dict[str, Any] = ispec[1] if len(ispec) > 1 else {}
            info = [input_type, extra]
            val = inputs[x]
            if isinstance(val, list):
                if len(val) != 2:
                    errors.append(
                        {
                            "type": "bad_linked_input",
                            "message": (
                                "Bad linked input, must be a length-2 list of [node_id, slot_index]"
                            ),
                            "details": f"{x}",
                            "extra_info": {
                                "input_name": x,
                                "input_config": info,
                                "received_value": val,
                            },
                        }
                    )
                    continue
                o_id = val[0]
                self.site = "link"
                o_class = self.prompt[o_id]["class_type"]
                self.site = "slot"
                received = NODES[o_class].outputs[val[1]]
                self.site = "other"
                if not validate_node_input(received, input_type):
                    errors.append(
                        {
                            "type": "return_type_mismatch",
                            "message": "Return type mismatch between linked nodes",
                            "details": (
                                f"{x}, received_type({received}) mismatch input_type({input_type})"
                            ),
                            "extra_info": {
                                "input_name": x,
                                "input_config": info,
                                "received_type": received,
                                "linked_node": val,
                            },
                        }
                    )
                    continue
                try:
                    if self.node(o_id)[0] is False:
                        valid = False
                except Exception as ex:  # noqa: BLE001 - ComfyUI blames the linked node
                    valid = False
                    self.validated[o_id] = (
                        False,
                        [
                            {
                                "type": "exception_during_inner_validation",
                                "message": "Exception when validating inner node",
                                "details": str(ex),
                                "extra_info": {
                                    "input_name": x,
                                    "input_config": info,
                                    "exception_message": str(ex),
                                    "exception_type": _full_type_name(ex),
                                    "traceback": [_TB_INNER, _frame(self.site)],
                                    "linked_node": val,
                                },
                            }
                        ],
                        o_id,
                    )
                    self.site = "other"
                continue
            if isinstance(val, dict) and "__value__" in val:
                val = val["__value__"]
                inputs[x] = val
            try:
                # Coercion rewrites the prompt in place, so history shows "16" as 16.
                if input_type == "INT":
                    val = int(val)
                    inputs[x] = val
                if input_type == "FLOAT":
                    val = float(val)
                    inputs[x] = val
                if input_type == "STRING":
                    val = str(val)
                    inputs[x] = val
                if input_type == "BOOLEAN":
                    val = bool(val)
                    inputs[x] = val
            except Exception as ex:  # noqa: BLE001 - any conversion failure is reported
                errors.append(
                    {
                        "type": "invalid_input_type",
                        "message": f"Failed to convert an input value to a {input_type} value",
                        "details": f"{x}, {val}, {ex}",
                        "extra_info": {
                            "input_name": x,
                            "input_config": info,
                            "received_value": val,
                            "exception_message": str(ex),
                        },
                    }
                )
                continue
            if x in spec.custom_validate:
                continue
            error = _range_or_combo(x, val, input_type, extra, info)
            if error is not None:
                errors.append(error)
        for x in spec.custom_validate:
            if x in inputs and not isinstance(inputs[x], list):
                errors.extend(self._custom(x, inputs[x]))
        verdict: Verdict = (False, errors, nid) if errors or not valid else (True, [], nid)
        self.validated[nid] = verdict
        return verdict

    def _custom(self, x: str, val: Any) -> list[Error]:
        if not isinstance(val, str):
            # ComfyUI calls str methods on the value: the same AttributeError ends up reported.
            raise AttributeError(f"'{type(val).__name__}' object has no attribute 'endswith'")  # noqa: TRY004
        name, folder = self.env.annotated(val)
        if os.path.exists(os.path.join(folder, name)):
            return []
        return [
            {
                "type": "custom_validation_failed",
                "message": "Custom validation failed for node",
                "details": f"{x} - Invalid image file: {val}",
                "extra_info": {"input_name": x},
            }
        ]


def _range_or_combo(
    x: str, val: Any, input_type: Any, extra: dict[str, Any], info: list[Any]
) -> Error | None:
    if "min" in extra and val < extra["min"]:
        return {
            "type": "value_smaller_than_min",
            "message": "Value {} smaller than min of {}".format(val, extra["min"]),
            "details": f"{x}",
            "extra_info": {"input_name": x, "input_config": info, "received_value": val},
        }
    if "max" in extra and val > extra["max"]:
        return {
            "type": "value_bigger_than_max",
            "message": "Value {} bigger than max of {}".format(val, extra["max"]),
            "details": f"{x}",
            "extra_info": {"input_name": x, "input_config": info, "received_value": val},
        }
    if isinstance(input_type, list) and val not in input_type:
        config: list[Any] | None = info
        if len(input_type) > 20:
            list_info = f"(list of length {len(input_type)})"
            config = None
        else:
            list_info = str(input_type)
        return {
            "type": "value_not_in_list",
            "message": "Value not in list",
            "details": f"{x}: '{val}' not in {list_info}",
            "extra_info": {"input_name": x, "input_config": config, "received_value": val},
        }
    return None


def validate_node_input(received: Any, wanted: Any) -> bool:
    """Link type check: equal, or comma-separated unions that overlap."""
    if received == wanted:
        return True
    if not isinstance(received, str) or not isinstance(wanted, str):
        return False
    return bool({t.strip() for t in received.split(",")} & {t.strip() for t in wanted.split(",")})


def _invalid(message: str, nid: str) -> tuple[bool, Error, list[str], dict[str, Any]]:
    return (
        False,
        {
            "type": "invalid_prompt",
            "message": message,
            "details": f"Node ID '#{nid}'",
            "extra_info": {},
        },
        [],
        {},
    )


def validate_prompt(
    prompt: Any, partial: Any, env: SimEnv
) -> tuple[bool, Error | None, list[str], dict[str, Any]]:
    """(ok, error, outputs_to_execute, node_errors) exactly like ComfyUI's validate_prompt."""
    if not isinstance(prompt, dict):
        if isinstance(prompt, (list, str)) and len(prompt) == 0:
            prompt = {}
        else:
            raise ServerCrash("prompt is not a dict")
    outputs: list[str] = []
    for x, node in prompt.items():
        if isinstance(node, dict):
            if "class_type" not in node:
                return _invalid(
                    "Cannot execute because a node is missing the class_type property.", x
                )
        elif isinstance(node, (list, str)) and "class_type" not in node:
            return _invalid("Cannot execute because a node is missing the class_type property.", x)
        else:
            raise ServerCrash("node is not a dict")
        class_type = node["class_type"]
        try:
            spec = NODES.get(class_type)
        except TypeError:
            raise ServerCrash("unhashable class_type") from None
        if spec is None:
            return _invalid(f"Cannot execute because node {class_type} does not exist.", x)
        if spec.output_node:
            try:
                wanted = partial is None or x in partial
            except TypeError:
                raise ServerCrash("bad partial_execution_targets") from None
            if wanted:
                outputs.append(x)
    if not outputs:
        return (
            False,
            {
                "type": "prompt_no_outputs",
                "message": "Prompt has no outputs",
                "details": "",
                "extra_info": {},
            },
            [],
            {},
        )
    v = _Validator(prompt, env)
    good: list[str] = []
    failed: list[tuple[str, list[Error]]] = []
    node_errors: dict[str, Any] = {}
    for o in outputs:
        try:
            ok, reasons, _ = v.node(o)
        except Exception as ex:  # noqa: BLE001 - reported as exception_during_validation
            ok = False
            reasons = [
                {
                    "type": "exception_during_validation",
                    "message": "Exception when validating node",
                    "details": str(ex),
                    "extra_info": {
                        "exception_type": _full_type_name(ex),
                        "traceback": [_TB_PROMPT, _frame(v.site)],
                    },
                }
            ]
            v.validated[o] = (False, reasons, o)
            v.site = "other"
        if ok is True:
            good.append(o)
            continue
        failed.append((o, reasons))
        for nid, (nid_ok, nid_reasons, _) in v.validated.items():
            if nid_ok is not True and nid_reasons:
                if nid not in node_errors:
                    node_errors[nid] = {
                        "errors": nid_reasons,
                        "dependent_outputs": [],
                        "class_type": prompt[nid]["class_type"],
                    }
                node_errors[nid]["dependent_outputs"].append(o)
    if not good:
        details = "\n".join(f"{e['message']}: {e['details']}" for _, errs in failed for e in errs)
        return (
            False,
            {
                "type": "prompt_outputs_failed_validation",
                "message": "Prompt outputs failed validation",
                "details": details,
                "extra_info": {},
            },
            [],
            node_errors,
        )
    return True, None, good, node_errors
