"""Node validation that reports each problem once, on the input it concerns.

ComfyUI 0.3.64 reports a failed ``validate_inputs`` once for every argument the function takes, each time
attributed to that argument (``execution.validate_inputs``). So each node's ``validate_inputs`` takes exactly
one input, the one its problems are shown on, and reads the other values it needs from its own entry in
the prompt being queued:

- ``POST /prompt`` runs the server's ``on_prompt`` handlers just before it validates the prompt, in the same
  asyncio task; ``remember_prompt`` (registered as one) keeps the prompt in a context variable, so each
  request sees only its own prompt;
- the node declares the hidden input ``unique_id``, which ComfyUI also fills during validation, so the
  node knows which entry is its own.

Values that arrive through a link are unknown before the graph runs, and a prompt validated without going
through ``POST /prompt`` has no entry: then ``sibling_values`` leaves them out, the check is skipped here,
and the node's ``execute`` makes the same check and raises the same message.
"""
from __future__ import annotations

from contextvars import ContextVar
from typing import Any

_PROMPT: ContextVar[dict | None] = ContextVar("wan_lora_moe_prompt", default=None)


def remember_prompt(json_data: Any) -> Any:
    """ComfyUI ``on_prompt`` handler: keep the queued prompt for this request's validation."""
    prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
    _PROMPT.set(prompt if isinstance(prompt, dict) else None)
    return json_data


def _own_inputs(node_cls) -> dict:
    prompt = _PROMPT.get()
    hidden = getattr(node_cls, "hidden", None)
    node_id = getattr(hidden, "unique_id", None)
    if prompt is None or node_id is None:
        return {}
    node = prompt.get(str(node_id))
    inputs = node.get("inputs") if isinstance(node, dict) else None
    return inputs if isinstance(inputs, dict) else {}


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)


def sibling_values(node_cls, *names: str) -> dict[str, Any]:
    """The literal values of the named inputs of the node being validated (linked or unknown ones left out)."""
    inputs = _own_inputs(node_cls)
    out = {}
    for name in names:
        value = inputs.get(name)
        if isinstance(value, dict) and "__value__" in value:  # how the front end sends list widget values
            value = value["__value__"]
        if value is not None and not _is_link(value):
            out[name] = value
    return out


def linked_node(node_cls, name: str) -> dict | None:
    """The prompt entry (``{"class_type", "inputs"}``) of the node whose output feeds input `name`, if known."""
    value = _own_inputs(node_cls).get(name)
    prompt = _PROMPT.get()
    if not _is_link(value) or prompt is None:
        return None
    node = prompt.get(str(value[0]))
    return node if isinstance(node, dict) else None


def register(server) -> None:
    """Add ``remember_prompt`` to a running ComfyUI ``PromptServer`` (once)."""
    if remember_prompt not in getattr(server, "on_prompt_handlers", []):
        server.add_on_prompt_handler(remember_prompt)
