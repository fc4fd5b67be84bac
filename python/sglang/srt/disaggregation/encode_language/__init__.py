"""Encode -> language disaggregation transport for multimodal (Qwen3-VL-MoE) requests.

Modules: ``manifest`` (layouts, request manifest, typed control messages), ``allocator`` (blocks),
``payload`` (what a request carries: ``MultimodalPayload``, ``ReceivedData``), ``round_plan``
(block layout, the segments of a round), ``buffers`` (``MultimodalDataBuffers``: the registered
blocks, copies in and out, stamps and checksums), ``connection`` (what both managers share),
``sender`` / ``receiver`` (the encode and language managers), ``exposures`` (language blocks a
late write may still reach). See docs/transport.md.
"""
