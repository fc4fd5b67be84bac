"""Encode -> language disaggregation transport for multimodal (Qwen3-VL-MoE) requests.

Modules: ``manifest`` (layouts, request manifest, typed control messages), ``allocator`` (blocks),
``buffers`` (``MultimodalDataBuffers``), ``connection`` (Mooncake manager/sender/receiver).
See docs/transport.md.
"""
