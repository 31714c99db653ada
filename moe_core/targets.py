"""Which projections carry experts, and at which rank: the method's default design.

Experts act on the last blocks, where instrument shape is decided: self/cross-attention q,k,v,o in the
last 8 blocks and the FFN's first linear in the last 3; rank 8 for q (most impactful), 4 elsewhere. Given
as a function of the model depth so a 10-layer test model and the 40-layer A14B share the same code.
"""
from __future__ import annotations

ATTENTION_PROJECTIONS = ("q", "k", "v", "o")


def default_targets(num_layers: int, last_blocks: int = 8, ffn_blocks: int = 3, rank_q: int = 8,
                    rank_kvo: int = 4, rank_ffn: int = 4) -> dict[str, int]:
    """Module path -> rank for the default target set of a `num_layers`-block WAN DiT."""
    if num_layers <= 0 or last_blocks <= 0 or ffn_blocks < 0:
        raise ValueError(f"invalid target layout: num_layers={num_layers}, last_blocks={last_blocks}, "
                         f"ffn_blocks={ffn_blocks}")
    first = max(0, num_layers - last_blocks)
    out: dict[str, int] = {}
    for b in range(first, num_layers):
        for attn in ("self_attn", "cross_attn"):
            for p in ATTENTION_PROJECTIONS:
                out[f"blocks.{b}.{attn}.{p}"] = rank_q if p == "q" else rank_kvo
        if b >= num_layers - ffn_blocks:
            out[f"blocks.{b}.ffn.0"] = rank_ffn
    return out


def linear_shape(module: str, dim: int, ffn_dim: int) -> tuple[int, int]:
    """(in, out) of a WAN block Linear; cross-attention k/v read the text context, already projected to dim."""
    if module.endswith("ffn.0"):
        return dim, ffn_dim
    if module.endswith("ffn.2"):
        return ffn_dim, dim
    return dim, dim
