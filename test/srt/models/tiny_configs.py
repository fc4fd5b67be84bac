"""Tiny transformers configs shared by the model unit tests (no checkpoint, no server)."""
from __future__ import annotations


def vl_config(indexes=(0, 1, 2), layers: int = 4, hidden: int = 8):
    """A Qwen3-VL-MoE config with deepstack_visual_indexes ``indexes`` (K = len(indexes))
    and M-RoPE text rope parameters."""
    from transformers import Qwen3VLMoeConfig

    return Qwen3VLMoeConfig(
        text_config=dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=4, moe_intermediate_size=6, num_experts=2,
                         num_experts_per_tok=1, vocab_size=32,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                          "mrope_section": [1, 0, 1], "mrope_interleaved": True}),
        vision_config=dict(depth=6, hidden_size=8, num_heads=2, intermediate_size=8, out_hidden_size=hidden,
                           deepstack_visual_indexes=list(indexes)),
    )
