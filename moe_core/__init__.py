"""Core of the WAN LoRA mixture-of-experts pack (independent of the ComfyUI node layer)."""
