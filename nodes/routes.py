"""Small read-only HTTP routes for the web extension (registered on ComfyUI's server when it runs).

- ``GET /wan_lora_moe/route?prompt=...&top_k=2&temperature=1&no_instrument=Other`` (or ``POST`` the same
  fields as a JSON object, for long prompts): what the Router node would detect for a prompt (live preview
  while typing). No files are read.
- ``GET /wan_lora_moe/files``: the LoRA-MoE files the Load node lists.
- ``GET /wan_lora_moe/file_info?name=...``: experts, adapter sets and defaults from one listed file's
  header. Only a name from that list is accepted: nothing outside ComfyUI's model folders can be read.

Every parameter is validated; bad input gets HTTP 400 (404 for an unknown file) with ``{"error": ...}``.
A prompt the Router would refuse (empty; no instrument with no_instrument=error) is a normal answer
carrying ``routing_error``.
"""
from __future__ import annotations

import math

from aiohttp import web

from ..moe_core.routing import RoutingError, rule_gates, rule_route
from ..moe_core.vocabulary import DEFAULT_EXPERT_NAMES, DEFAULT_INSTRUMENTS
from .common import header_summary, list_lora_moe_files, resolve_lora_moe_file
from . import validation
from .router import FALLBACKS

PREFIX = "/wan_lora_moe"
MAX_PROMPT_CHARS = 20_000


def _bad(message: str, status: int = 400) -> web.Response:
    return web.json_response({"error": message}, status=status)


def route_preview(query) -> tuple[dict, int]:
    """The /route answer for a query mapping: (json body, status). Pure, so tests can call it directly."""
    prompt = query.get("prompt", "")
    if len(prompt) > MAX_PROMPT_CHARS:
        return {"error": f"prompt longer than {MAX_PROMPT_CHARS} characters"}, 400
    try:
        top_k = int(query.get("top_k", "2"))
        temperature = float(query.get("temperature", "1.0"))
    except ValueError:
        return {"error": "top_k must be an integer and temperature a number"}, 400
    if not 1 <= top_k <= 8 or not (math.isfinite(temperature) and 0 < temperature <= 100):
        return {"error": "top_k must be in 1..8 and temperature in (0, 100]"}, 400
    fallback = query.get("no_instrument", FALLBACKS[0])
    if fallback not in FALLBACKS:
        return {"error": f"no_instrument must be one of {list(FALLBACKS)}"}, 400
    try:
        routing = rule_route(prompt, DEFAULT_EXPERT_NAMES, fallback=fallback,
                             top_k=min(top_k, len(DEFAULT_EXPERT_NAMES)), temperature=temperature)
    except RoutingError as e:  # what the node would report (empty prompt, no instrument with 'error')
        return {"routing_error": str(e), "detected": [], "gates": {}, "line": str(e)}, 200
    gates = rule_gates(routing, DEFAULT_EXPERT_NAMES)
    return {"detected": list(routing.detected), "gates": gates, "note": routing.note,
            "line": routing.describe(gates)}, 200


def register(routes: web.RouteTableDef) -> None:
    @routes.get(PREFIX + "/route")
    async def _route(request: web.Request) -> web.Response:
        body, status = route_preview(request.rel_url.query)
        return web.json_response(body, status=status)

    @routes.post(PREFIX + "/route")
    async def _route_post(request: web.Request) -> web.Response:
        if request.content_length is not None and request.content_length > 4 * MAX_PROMPT_CHARS + 1024:
            return _bad("request body too large", 413)
        try:
            query = await request.json()
        except ValueError:
            return _bad("the body must be a JSON object")
        if not isinstance(query, dict) or not all(isinstance(v, (str, int, float)) for v in query.values()):
            return _bad("the body must be a JSON object of strings and numbers")
        body, status = route_preview({k: str(v) for k, v in query.items()})
        return web.json_response(body, status=status)

    @routes.get(PREFIX + "/vocabulary")
    async def _vocabulary(request: web.Request) -> web.Response:
        return web.json_response([{"name": i.name, "chinese": i.chinese, "keywords": list(i.keywords)}
                                  for i in DEFAULT_INSTRUMENTS])

    @routes.get(PREFIX + "/files")
    async def _files(request: web.Request) -> web.Response:
        return web.json_response(list_lora_moe_files())

    @routes.get(PREFIX + "/file_info")
    async def _file_info(request: web.Request) -> web.Response:
        name = request.rel_url.query.get("name", "")
        if not name or len(name) > 1024 or "\x00" in name:
            return _bad("query parameter 'name' must be a listed LoRA-MoE file name")
        if name not in list_lora_moe_files():
            return _bad("unknown LoRA-MoE file (see /wan_lora_moe/files)", 404)
        try:
            return web.json_response(dict(header_summary(resolve_lora_moe_file(name)), name=name))
        except (OSError, ValueError) as e:  # ValueError covers JSON errors in a damaged header
            return _bad(f"{name}: unreadable LoRA-MoE header ({type(e).__name__})", 422)


def register_with_server() -> bool:
    """Add the routes, and the prompt hook node validation reads (validation.py), to the running ComfyUI
    server, if there is one (not under pytest or scripts)."""
    import sys

    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None or getattr(instance, "_wan_lora_moe_routes", False):
        return False
    register(instance.routes)
    validation.register(instance)
    instance._wan_lora_moe_routes = True
    return True
