"""Convert a ComfyUI workflow saved by the front end (UI format) to the API format the server runs.

Used by the demo (``training.mission`` runs the bundled workflows headless), by the end-to-end and browser
tests (``tests/test_browser.py`` checks it against the front end's own conversion) and by
``scripts/build_workflows.py`` (widget order). Standard library only.

UI format: ``nodes`` with positional ``widgets_values`` and ``inputs`` slots carrying link ids, plus
``links`` as ``[link_id, from_node, from_slot, to_node, to_slot, type]``. API format:
``{node_id: {"class_type": ..., "inputs": {name: value | [from_node_id, from_slot]}}}``.

The rules follow the front end (comfyui-frontend-package 1.27, ``graphToPrompt`` and
``migrateWidgetsValues``), using the server's ``/object_info`` for each node class:

* widget inputs are the node's required then optional inputs whose type is a widget type (INT, FLOAT,
  STRING, BOOLEAN, COMBO / a list of options) and that are not ``forceInput``; ``widgets_values`` holds
  their values in that order;
* after an input with ``control_after_generate`` (or an INT named ``seed`` / ``noise_seed``), the front
  end adds a ``control_after_generate`` widget ("fixed", "randomize", ...) whose value is in
  ``widgets_values`` but which is not an input of the node: it is skipped;
* a linked input wins over its widget value (a widget converted to an input keeps its stale value);
* nodes muted (mode 2) are dropped, and so are their links; bypassed nodes (mode 4) pass each input
  through to the first output of the same type; front-end-only nodes (Note, MarkdownNote, Reroute,
  PrimitiveNode) are not emitted: links through a Reroute are followed, a PrimitiveNode's value is
  written into the inputs it feeds;
* the API node ids are the UI node ids, as strings;
* a required combo with an upload button (``image_upload``, ``video_upload``, ``animated_image_upload``: e.g.
  LoadImage) gets the front end's ``upload`` button widget after the node's required inputs: its value
  (``"image"``) is in ``widgets_values`` but it is no input.

Not supported (raise ``ConversionError``): subgraphs, group nodes, other upload widgets (``file_upload``).
"""
from __future__ import annotations

from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
#: Combo options for which the front end adds an upload button (its extension Comfy.UploadImage).
MEDIA_UPLOADS = ("image_upload", "video_upload", "animated_image_upload")
#: The name of that button widget: saved in widgets_values (value "image"), never an input of the prompt.
UPLOAD_BUTTON = "upload"
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
MUTED, BYPASSED = 2, 4


class ConversionError(ValueError):
    pass


def is_widget(spec: Any) -> bool:
    """True if an /object_info input spec ``[type, options]`` becomes a widget in the front end."""
    kind = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if options.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def has_control_widget(name: str, spec: Any) -> bool:
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return bool(options.get("control_after_generate")) or name in ("seed", "noise_seed")


def has_upload_button(info: dict) -> bool:
    """True if the front end adds its ``upload`` button to this node (a required media combo: LoadImage)."""
    for spec in info["input"].get("required", {}).values():
        options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        if isinstance(spec[0], list) or spec[0] == "COMBO":
            if any(options.get(k) for k in MEDIA_UPLOADS):
                return True
    return False


def widget_names(info: dict) -> list[tuple[str, bool]]:
    """(input name, followed by a control_after_generate widget) for each widget, in front-end order; a node
    with an upload button has ``UPLOAD_BUTTON`` after its required widgets (a value, no input)."""
    out = []
    for section in ("required", "optional"):
        specs = info["input"].get(section, {})
        for name in info.get("input_order", {}).get(section, list(specs)):
            spec = specs[name]
            if is_widget(spec):
                options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if any(options.get(k) for k in ("audio_upload", "file_upload")) or (
                        section == "optional" and any(options.get(k) for k in MEDIA_UPLOADS)):
                    raise ConversionError(f"input '{name}' has an upload widget, which this converter does not map")
                out.append((name, has_control_widget(name, spec)))
        if section == "required" and has_upload_button(info):
            out.append((UPLOAD_BUTTON, False))
    return out


def convert(workflow: dict, object_info: dict) -> dict:
    """The API-format prompt of a UI-format workflow (see the module docstring for the rules)."""
    if workflow.get("definitions", {}).get("subgraphs"):
        raise ConversionError("subgraphs are not supported")
    nodes = {int(n["id"]): n for n in workflow["nodes"]}
    links = {int(l[0]): l for l in workflow.get("links", [])}

    def source(link_id: int, want_type: str | None = None, seen: frozenset = frozenset()) -> Any:
        """What a link delivers: ``[node_id, slot]``, a literal (from a PrimitiveNode), or None."""
        if link_id in seen:
            raise ConversionError(f"link cycle through link {link_id}")
        link = links.get(int(link_id))
        if link is None:
            raise ConversionError(f"link {link_id} is not in the workflow's links")
        _, from_id, from_slot, _, _, ltype = link[:6]
        origin = nodes[int(from_id)]
        mode = origin.get("mode", 0)
        if mode == MUTED:
            return None
        if origin["type"] == "Reroute":
            upstream = origin["inputs"][0].get("link")
            return None if upstream is None else source(upstream, want_type, seen | {link_id})
        if origin["type"] == "PrimitiveNode":
            return {"__literal__": origin["widgets_values"][0]}
        if mode == BYPASSED:
            out_type = origin["outputs"][from_slot]["type"]
            for inp in origin.get("inputs", []):
                if inp.get("link") is not None and inp.get("type") == out_type:
                    return source(inp["link"], out_type, seen | {link_id})
            return None
        return [str(origin["id"]), int(from_slot)]

    prompt: dict[str, dict] = {}
    for nid, node in sorted(nodes.items()):
        kind = node["type"]
        if kind in FRONTEND_ONLY or node.get("mode", 0) in (MUTED, BYPASSED):
            continue
        if kind not in object_info:
            raise ConversionError(f"node {nid} has type '{kind}', which the server does not know (missing node)")
        info = object_info[kind]
        inputs: dict[str, Any] = {}
        values = list(node.get("widgets_values") or [])
        if isinstance(node.get("widgets_values"), dict):
            raise ConversionError(f"node {nid} ({kind}) stores widgets_values as a dict (not supported)")
        k = 0
        optional = info["input"].get("optional", {})
        upload = has_upload_button(info)
        for name, control in widget_names(info):
            if upload and name == UPLOAD_BUTTON:  # the button's value (if saved) is no input
                k += 1
                continue
            if k >= len(values):
                if name in optional:  # saved before the node had this input: the front end keeps its default
                    continue
                raise ConversionError(f"node {nid} ({kind}): widgets_values has no value for '{name}'")
            inputs[name] = values[k]
            k += 2 if control else 1
        for slot in node.get("inputs", []):
            link_id = slot.get("link")
            name = (slot.get("widget") or {}).get("name") or slot["name"]
            if link_id is None:
                continue
            delivered = source(link_id)
            if delivered is None:
                inputs.pop(name, None)
            elif isinstance(delivered, dict):
                inputs[name] = delivered["__literal__"]
            else:
                inputs[name] = delivered
        prompt[str(nid)] = {"class_type": kind, "inputs": inputs, "_meta": {"title": node.get("title") or kind}}
    return prompt


def strip_meta(prompt: dict) -> dict:
    """The prompt without ``_meta`` (titles), for comparisons."""
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in prompt.items()}
