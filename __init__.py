"""ComfyUI-WanLoRAMoE: a LoRA mixture-of-experts for WAN 2.2 (nodes: Load LoRA-MoE, Prompt→Instrument Router,
Gate Override, Timestep Band).

ComfyUI imports this file as the package of the pack's folder in ``custom_nodes/`` and awaits
``comfy_entrypoint()`` (V3 nodes). Everything is imported relatively: ComfyUI owns the top-level names
``nodes`` and ``utils``, so this pack's ``nodes/`` is only reachable as ``<this package>.nodes``.
Outside ComfyUI (pytest, scripts) ``ensure_comfy`` first makes ComfyUI importable; inside it, it does nothing.

A bare ``pytest`` run in the checkout imports this file too: as a package when the folder name is an
identifier, else (``ComfyUI-WanLoRAMoE``) as a plain top-level module with no package to import from. In
that case only ``WEB_DIRECTORY`` is defined and nothing else is loaded.
"""
WEB_DIRECTORY = "./web"

if __package__:
    from .moe_core.comfy_runtime import ensure_comfy as _ensure_comfy

    _ensure_comfy()

    from .nodes import NODES, WanLoRAMoEExtension, register_with_server  # noqa: E402

    async def comfy_entrypoint() -> WanLoRAMoEExtension:
        return WanLoRAMoEExtension()

    register_with_server()

    __all__ = ["NODES", "WEB_DIRECTORY", "comfy_entrypoint"]
else:  # imported as a plain module (see above): not a ComfyUI load
    __all__ = ["WEB_DIRECTORY"]
