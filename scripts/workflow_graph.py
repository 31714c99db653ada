"""Writing ComfyUI UI-format workflows from code (used by scripts/build_workflows.py).

`Graph` holds nodes, links and groups and writes the JSON the front end saves: widget values by input name
placed in the front end's order (`moe_core.workflow_api.widget_names`, the same rules the converter to API
prompts follows), so a change of a node's inputs is an error here instead of a silently shifted value.
Node definitions come from an in-process ComfyUI (`object_info_inprocess`) or a server's /object_info.
"""
from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

from moe_core.workflow_api import UPLOAD_BUTTON, has_upload_button, widget_names

PACK_NODE_PROPS = {"cnr_id": "comfyui-wanloramoe", "ver": "0.1.0"}
CORE_NODE_PROPS = {"cnr_id": "comfy-core", "ver": "0.3.64"}


# ----------------------------------------------------------------------------------------- node infos

def object_info_inprocess() -> dict:
    """/object_info as the server would send it: ComfyUI's core and extra nodes plus this pack's nodes."""
    from moe_core.comfy_runtime import ensure_comfy

    ensure_comfy(cpu=True)
    import utils  # noqa: F401  ComfyUI's utils package, imported before nodes as main.py does (some
    # comfy modules put comfy/ on sys.path, where a utils.py would shadow it)
    import tempfile

    import folder_paths

    scratch = tempfile.mkdtemp(prefix="wlm-build-")  # some node modules create folders at import
    folder_paths.set_input_directory(scratch)
    folder_paths.set_output_directory(scratch)
    folder_paths.set_temp_directory(scratch)
    import nodes  # ComfyUI's nodes.py

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    from pack_fixtures import import_pack

    pack = import_pack()
    for cls in pack.NODES:
        nodes.NODE_CLASS_MAPPINGS[cls.GET_SCHEMA().node_id] = cls
    out = {}
    for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
        if hasattr(cls, "GET_NODE_INFO_V1"):
            out[name] = cls.GET_NODE_INFO_V1()
            continue
        spec = cls.INPUT_TYPES()
        out[name] = {"input": spec, "input_order": {k: list(v) for k, v in spec.items()},
                     "output": list(cls.RETURN_TYPES),
                     "output_name": list(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES),
                     "display_name": nodes.NODE_DISPLAY_NAME_MAPPINGS.get(name, name)}
    return out


def object_info_from(source: str) -> dict:
    if source.startswith("http"):
        import urllib.request

        with urllib.request.urlopen(source) as r:
            return json.load(r)
    return json.loads(Path(source).read_text())


# -------------------------------------------------------------------------------------------- builder

def _spec_default(spec: list) -> Any:
    kind, options = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    if "default" in options:
        return options["default"]
    if isinstance(kind, list):
        return kind[0] if kind else None
    if kind == "COMBO":
        return (options.get("options") or [None])[0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(kind)


class Node:
    def __init__(self, graph: "Graph", nid: int, kind: str, pos, size, title, widgets, color, properties):
        self.graph, self.id, self.kind = graph, nid, kind
        self.pos, self.size, self.title, self.color = list(pos), list(size), title, color
        self.widgets = dict(widgets or {})
        self.properties = properties
        self.in_links: dict[str, int] = {}
        self.out_links: dict[int, list[int]] = {}

    @property
    def info(self) -> dict:
        return self.graph.info[self.kind]

    def to_json(self, order: int) -> dict:
        if self.kind in ("Note", "MarkdownNote"):
            return {"id": self.id, "type": self.kind, "pos": self.pos, "size": self.size, "flags": {},
                    "order": order, "mode": 0, "inputs": [], "outputs": [], "title": self.title,
                    "properties": {}, "widgets_values": [self.widgets["text"]],
                    **({"color": self.color[0], "bgcolor": self.color[1]} if self.color else {})}
        info = self.info
        widgets = widget_names(info)
        names = {n for n, _ in widgets}
        unknown = set(self.widgets) - names
        if unknown:
            raise KeyError(f"{self.kind}: no widget inputs {sorted(unknown)}; it has {sorted(names)}")
        values: list[Any] = []
        for name, control in widgets:
            if name == UPLOAD_BUTTON and has_upload_button(info):  # LoadImage's upload button: value "image"
                values.append("image")
                continue
            section = "required" if name in info["input"].get("required", {}) else "optional"
            spec = info["input"][section][name]
            values.append(self.widgets.get(name, _spec_default(spec)))
            if control:
                values.append("fixed")
        inputs = []
        for section in ("required", "optional"):
            specs = info["input"].get(section, {})
            for name in info.get("input_order", {}).get(section, list(specs)):
                spec = specs[name]
                is_widget = name in names
                if is_widget and name not in self.in_links:
                    continue
                kind = spec[0] if isinstance(spec[0], str) else "COMBO"
                slot = {"name": name, "type": kind, "link": self.in_links.get(name)}
                if section == "optional" and not is_widget:
                    slot["shape"] = 7
                if is_widget:
                    slot["widget"] = {"name": name}
                inputs.append(slot)
        outputs = []
        for i, (otype, oname) in enumerate(zip(info["output"], info.get("output_name", info["output"]))):
            outputs.append({"name": oname, "type": otype if isinstance(otype, str) else "COMBO",
                            "links": self.out_links.get(i, []), "slot_index": i})
        props = dict(PACK_NODE_PROPS if self.kind.startswith("WanLoRAMoE_") else CORE_NODE_PROPS)
        props["Node name for S&R"] = self.kind
        urls = self.graph.model_urls
        models = [{"name": v, "url": urls[v][0], "directory": urls[v][1]}
                  for v in self.widgets.values() if isinstance(v, str) and v in urls]
        if models:
            props["models"] = models
        props.update(self.properties or {})
        out = {"id": self.id, "type": self.kind, "pos": self.pos, "size": self.size, "flags": {}, "order": order,
               "mode": 0, "inputs": inputs, "outputs": outputs, "properties": props, "widgets_values": values}
        if self.title:
            out["title"] = self.title
        if self.color:
            out["color"], out["bgcolor"] = self.color
        return out


class Graph:
    def __init__(self, name: str, info: dict, model_urls: dict[str, tuple[str, str]] | None = None):
        """`info`: /object_info; `model_urls`: model file name -> (download URL, models folder), written into
        the properties of the nodes that load them (the front end offers the download)."""
        self.name, self.info = name, info
        self.model_urls = model_urls or {}
        self.nodes: list[Node] = []
        self.links: list[list] = []
        self.groups: list[dict] = []

    def add(self, kind: str, pos, size=(320, 120), title: str | None = None, widgets: dict | None = None,
            color: tuple[str, str] | None = None, properties: dict | None = None) -> Node:
        if kind not in ("Note", "MarkdownNote") and kind not in self.info:
            raise KeyError(f"unknown node type {kind}")
        node = Node(self, len(self.nodes) + 1, kind, pos, size, title, widgets, color, properties)
        self.nodes.append(node)
        return node

    def note(self, text: str, pos, size, title: str) -> Node:
        return self.add("MarkdownNote", pos, size, title=title, widgets={"text": text})

    def connect(self, src: Node, output: int | str, dst: Node, name: str) -> None:
        if isinstance(output, str):
            names = src.info.get("output_name", src.info["output"])
            output = list(names).index(output)
        otype = src.info["output"][output]
        link_id = len(self.links) + 1
        dst_specs = {**dst.info["input"].get("required", {}), **dst.info["input"].get("optional", {})}
        if name not in dst_specs:
            raise KeyError(f"{dst.kind} has no input {name}")
        self.links.append([link_id, src.id, output, dst.id, None, otype])  # to_slot filled in to_json
        dst.in_links[name] = link_id
        src.out_links.setdefault(output, []).append(link_id)

    def group(self, title: str, nodes: list[Node], color: str = "#3f789e", pad: int = 75) -> None:
        x0 = min(n.pos[0] for n in nodes) - 10
        y0 = min(n.pos[1] for n in nodes) - pad
        x1 = max(n.pos[0] + n.size[0] for n in nodes) + 10
        y1 = max(n.pos[1] + n.size[1] for n in nodes) + 10
        self.groups.append({"id": len(self.groups) + 1, "title": title, "bounding": [x0, y0, x1 - x0, y1 - y0],
                            "color": color, "font_size": 22, "flags": {}})

    def to_json(self) -> dict:
        nodes = [n.to_json(i) for i, n in enumerate(self.nodes)]
        by_id = {n["id"]: n for n in nodes}
        for link in self.links:
            dst = by_id[link[3]]
            link[4] = next(i for i, s in enumerate(dst["inputs"]) if s["link"] == link[0])
        return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-wanloramoe/{self.name}")), "revision": 0,
                "last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": nodes,
                "links": self.links, "groups": self.groups, "config": {},
                "extra": {"ds": {"scale": 0.55, "offset": [60, 120]}}, "version": 0.4}
