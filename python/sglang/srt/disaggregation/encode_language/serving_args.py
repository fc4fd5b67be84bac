"""Start-up validation and defaults of ``--disaggregation-mode encode|language``.

Called from upstream's ``handle_pd_disaggregation`` (after ``mooncake_tcp`` became
``mooncake``), so a wrong combination fails before any process is started, with a message
that names the flag to change.

What each mode implies:

* ``encode``: the checkpoint's VL class is built with upstream's ``encoder_only`` switch (vision
  tower only); the scheduler runs the encode loop (``encode_scheduler.py``). Its control socket
  binds ``--host`` on ``--disaggregation-bootstrap-port`` (the port given after ``--prefill
  URL`` to the router), as upstream's PD bootstrap server. Overlap scheduling and CUDA graphs
  are off (the encode loop runs no language forward). With ``--tp N`` every rank runs the TP
  vision tower and rank 0 alone owns the transfer.
* ``language``: ``Qwen3MoeForCausalLM`` is built from the VL checkpoint (the architecture is
  overridden unless ``--json-model-override-args`` already names one); no multimodal processor
  runs there; requests with media wait for their rows in ``language_mm_receiver.py``. Prefill
  CUDA graphs are off (the rows enter the prefill in the model's Python forward).

Features a mode cannot serve correctly (``_UNSUPPORTED``: PP, DP attention, replica DP on the
encode side, attention CP, pdmux, ...) are refused here; docs/serving.md "Feature
compatibility" lists every feature.
"""

from __future__ import annotations

import json
import logging
from typing import Optional

from sglang.srt.arg_groups.overrides import (
    declare_resolution,
    model_config_of,
    resolving_view,
)
from sglang.srt.disaggregation.encode_language.connection import ConnectionConfig
from sglang.srt.model_executor.cuda_graph_config import CudaGraphConfig

logger = logging.getLogger(__name__)

LANGUAGE_ARCHITECTURE = "Qwen3MoeForCausalLM"
_SOURCE = "handle_encode_language_disaggregation"


def handle_encode_language_disaggregation(server_args) -> None:
    cfg = resolving_view(server_args)
    mode = cfg.disaggregation_mode
    flag = f"--disaggregation-mode {mode}"
    if cfg.encoder_only or cfg.language_only:
        other = "--encoder-only" if cfg.encoder_only else "--language-only"
        raise ValueError(
            f"{flag} cannot be combined with {other}: {other} selects upstream's encoder "
            f"disaggregation, a different protocol. Use one or the other."
        )
    if cfg.disaggregation_transfer_backend != "mooncake":
        raise ValueError(
            f"{flag} supports only --disaggregation-transfer-backend mooncake "
            f"(or mooncake_tcp), got {cfg.disaggregation_transfer_backend!r}"
        )
    # The transfer settings and addressing rules (a bind_host override on the encode side),
    # refused before any process starts rather than when a scheduler builds its manager.
    ConnectionConfig.from_server_args(cfg)
    _refuse_unsupported(cfg, mode, flag)
    if mode == "encode":
        _handle_encode(server_args, cfg, flag)
    else:
        _handle_language(server_args, cfg, flag)


# Features either mode refuses at start-up: (mode(s), is it asked for?, the flag, why). The
# table in docs/serving.md ("Feature compatibility") lists these and what each mode does with
# the rest; test_serving_args.py starts the real argument pipeline with each.
_UNSUPPORTED = (
    (
        ("encode", "language"),
        lambda c: c.pp_size > 1,
        "pipeline parallelism (--pp-size > 1)",
        {
            "encode": "the encode loop runs no pipeline",
            "language": "rows are received by one process per attention-TP group and "
            "embedded by the first stage, but deepstack rows are added in the first K "
            "layers, which later stages may hold: no stage split is built",
        },
    ),
    (
        ("encode", "language"),
        lambda c: c.attn_dp_size > 1,
        "DP attention (--attn-dp-size / --enable-dp-attention)",
        "one transfer owner per attention-DP group (encode: one control socket per "
        "bootstrap port) is not built",
    ),
    (
        ("encode",),
        lambda c: c.dp_size > 1,
        "data parallelism (--dp-size > 1)",
        "every replica's transfer owner would bind the same --host:"
        "--disaggregation-bootstrap-port, the one address the router hands out for it; "
        "run one encode server per replica (one --prefill URL and bootstrap port each)",
    ),
    (
        ("encode", "language"),
        lambda c: c.attn_cp_size > 1 or c.dcp_size > 1,
        "attention context parallelism (--attn-cp-size / --dcp-size > 1)",
        "received rows are not split across context-parallel ranks",
    ),
    (
        ("encode", "language"),
        lambda c: c.enable_pdmux,
        "PD multiplexing (--enable-pdmux)",
        {
            "encode": "the encode loop runs no prefill or decode",
            "language": "its forward path does not take the received multimodal rows",
        },
    ),
    (
        ("encode", "language"),
        lambda c: c.enable_pd_role_switch,
        "PD role switching (--enable-pd-role-switch)",
        "an encode or language server cannot become a prefill or decode server",
    ),
    (
        ("language",),
        lambda c: c.enable_mm_global_cache or c.mm_enable_dp_encoder,
        "--enable-mm-global-cache / --mm-enable-dp-encoder",
        "the language server runs no vision tower (the encode server does)",
    ),
    (
        ("encode",),
        lambda c: c.speculative_algorithm is not None,
        "speculative decoding (--speculative-algorithm)",
        "it runs no language model",
    ),
    (
        ("language",),
        lambda c: c.speculative_algorithm is not None,
        "speculative decoding (--speculative-algorithm)",
        "the draft model's forward path does not take the received multimodal rows",
    ),
    (
        ("encode",),
        lambda c: c.enable_lora,
        "LoRA (--enable-lora)",
        "it runs no language model, where adapters apply",
    ),
    (
        ("encode",),
        lambda c: c.enable_hierarchical_cache,
        "HiCache (--enable-hierarchical-cache)",
        "it keeps no KV cache",
    ),
    (
        ("encode", "language"),
        lambda c: _graph_backend_asked(c, "prefill") not in (None, "disabled"),
        "prefill CUDA graphs (--cuda-graph-backend-prefill / --cuda-graph-config)",
        {
            "encode": "it runs no prefill",
            "language": "the received rows enter the prefill in the model's Python "
            "forward, which a captured prefill graph is not shown to replay",
        },
    ),
    (
        ("encode",),
        lambda c: _graph_backend_asked(c, "decode") not in (None, "disabled"),
        "decode CUDA graphs (--cuda-graph-backend-decode / --cuda-graph-config)",
        "it runs no decode",
    ),
)


def _graph_backend_asked(cfg, phase: str) -> Optional[str]:
    """The CUDA-graph backend the user asked for in ``phase``, None if not asked.

    Upstream's ``parse_cuda_graph_config`` (run after this hook) resolves it with this
    precedence: the ``--cuda-graph-config`` JSON, then ``--cuda-graph-backend-PHASE``, then
    the ``disable_*_cuda_graph`` switches this hook declares, and locks the phase's backend, so
    no later default turns a graph on: what is asked here is what resolves.
    """
    explicit = cfg.cuda_graph_config
    if isinstance(explicit, CudaGraphConfig):
        explicit = explicit.to_dict()  # only the fields set away from the defaults
    backend = ((explicit or {}).get(phase) or {}).get("backend")
    if backend is None:
        backend = getattr(cfg, f"cuda_graph_backend_{phase}")
    return backend


def _refuse_unsupported(cfg, mode: str, flag: str) -> None:
    for modes, asked, what, why in _UNSUPPORTED:
        if mode in modes and asked(cfg):
            reason = why[mode] if isinstance(why, dict) else why
            raise ValueError(f"{flag} does not support {what}: {reason}")


def _handle_encode(server_args, cfg, flag: str) -> None:
    _require_vision_config(server_args, flag)
    # The encode loop calls the vision tower only: no overlap, no graphs of a language forward.
    declare_resolution(
        server_args,
        _SOURCE,
        disable_overlap_schedule=True,
        disable_decode_cuda_graph=True,
        disable_prefill_cuda_graph=True,
    )


def _handle_language(server_args, cfg, flag: str) -> None:
    overrides = json.loads(cfg.json_model_override_args or "{}")
    if "architectures" not in overrides:
        overrides["architectures"] = [LANGUAGE_ARCHITECTURE]
        declare_resolution(
            server_args, _SOURCE, json_model_override_args=json.dumps(overrides)
        )
    _require_vision_config(server_args, flag)
    # Received rows enter the prefill in the model's Python forward (prepare_mm_inputs):
    # prefill graphs off; decode graphs stay (decode batches carry no rows).
    declare_resolution(server_args, _SOURCE, disable_prefill_cuda_graph=True)


def _require_vision_config(server_args, flag: str) -> None:
    hf_config = model_config_of(server_args).hf_config
    if getattr(hf_config, "vision_config", None) is None:
        raise ValueError(
            f"{flag} needs a vision-language checkpoint (a config with vision_config), but "
            f"{resolving_view(server_args).model_path} has none"
        )
