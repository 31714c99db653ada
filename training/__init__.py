"""Headless training for the WAN LoRA mixture-of-experts.

Run the entry points as modules from the repository root (``python -m training.build_manifest ...``).
``training.data`` turns a folder of captioned clips into a validated manifest, decoded and bucketed frame
windows, instrument labels, and a reusable cache of VAE latents and text embeddings; the engine itself lives
in ``moe_core``.
"""
