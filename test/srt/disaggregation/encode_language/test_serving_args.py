"""Start-up validation of ``--disaggregation-mode encode|language`` (patch 0010): wrong
combinations fail with a message naming the flag; right ones get the documented defaults.

Runs SGLang's real server-argument pipeline (``ServerArgs.resolve_once``) on tiny generated
checkpoints; no server is started.
"""

from __future__ import annotations

import json

import pytest
from epd_testbed.tiny_ckpt import TinyTextMoeSpec, TinyVLMoeSpec, ensure_checkpoint


@pytest.fixture(scope="module")
def vl_model() -> str:
    return str(ensure_checkpoint(TinyVLMoeSpec()))


@pytest.fixture(scope="module")
def text_model() -> str:
    return str(ensure_checkpoint(TinyTextMoeSpec()))


def _resolve(model_path: str, **kwargs):
    from sglang.srt.arg_groups.overrides import resolved_view
    from sglang.srt.server_args import ServerArgs

    server_args = ServerArgs(model_path=model_path, dtype="float32", **kwargs)
    server_args.resolve_once()
    return server_args, resolved_view(server_args)


@pytest.mark.parametrize(
    "mode, flag",
    [
        ("encode", "encoder_only"),
        ("encode", "language_only"),
        ("language", "language_only"),
        ("language", "encoder_only"),
    ],
)
def test_modes_refuse_upstream_epd_flags(vl_model, mode, flag) -> None:
    other = "--" + flag.replace("_", "-")
    with pytest.raises(
        ValueError,
        match=f"--disaggregation-mode {mode} cannot be combined with {other}",
    ):
        _resolve(vl_model, disaggregation_mode=mode, **{flag: True})


@pytest.mark.parametrize("mode", ["encode", "language"])
def test_only_mooncake_backend(vl_model, mode) -> None:
    with pytest.raises(
        ValueError,
        match=f"--disaggregation-mode {mode} supports only "
        r"--disaggregation-transfer-backend mooncake \(or mooncake_tcp\), got 'nixl'",
    ):
        _resolve(
            vl_model, disaggregation_mode=mode, disaggregation_transfer_backend="nixl"
        )


@pytest.mark.parametrize("mode", ["encode", "language"])
def test_checkpoint_without_vision_config(text_model, mode) -> None:
    with pytest.raises(
        ValueError,
        match=f"--disaggregation-mode {mode} needs a vision-language checkpoint",
    ):
        _resolve(text_model, disaggregation_mode=mode)


# Features refused at start-up (docs/serving.md "Feature compatibility"): mode, the arguments,
# what the message names. Each runs SGLang's real argument pipeline.
REFUSED = [
    ("encode", {"pp_size": 2}, "pipeline parallelism", "runs no pipeline"),
    ("language", {"pp_size": 2}, "pipeline parallelism", "no stage split is built"),
    *(
        (mode, args, what, why)
        for mode in ("encode", "language")
        for args, what, why in (
            (
                {"tp_size": 2, "dp_size": 2, "enable_dp_attention": True},
                "DP attention",
                "one transfer owner per attention-DP group",
            ),
            (
                {"tp_size": 2, "attn_cp_size": 2},
                "attention context parallelism",
                "not split across context-parallel ranks",
            ),
            (
                {"enable_pd_role_switch": True},
                "PD role switching",
                "cannot become a prefill or decode server",
            ),
            (
                {"cuda_graph_backend_prefill": "breakable"},
                "prefill CUDA graphs",
                "",
            ),
            ({"speculative_algorithm": "NGRAM"}, "speculative decoding", ""),
            # The JSON wins over every other graph flag in upstream's resolution.
            (
                {"cuda_graph_config": {"prefill": {"backend": "breakable"}}},
                "prefill CUDA graphs",
                "",
            ),
        )
    ),
    (
        "encode",
        {"dp_size": 2},
        "data parallelism",
        "would bind the same --host:--disaggregation-bootstrap-port",
    ),
    ("encode", {"enable_pdmux": True}, "PD multiplexing", "runs no prefill or decode"),
    (
        "language",
        {"enable_pdmux": True},
        "PD multiplexing",
        "does not take the received multimodal rows",
    ),
    (
        "encode",
        {"cuda_graph_backend_decode": "full"},
        "decode CUDA graphs",
        "no decode",
    ),
    (
        "encode",
        {"cuda_graph_config": {"decode": {"backend": "full"}}},
        "decode CUDA graphs",
        "no decode",
    ),
    ("encode", {"enable_lora": True, "max_lora_rank": 8}, "LoRA", "no language model"),
    ("encode", {"enable_hierarchical_cache": True}, "HiCache", "keeps no KV cache"),
    ("language", {"enable_mm_global_cache": True}, "--enable-mm-global-cache", ""),
    (
        "language",
        {"tp_size": 2, "mm_enable_dp_encoder": True},
        "--mm-enable-dp-encoder",
        "runs no vision tower",
    ),
]


def _case_id(mode: str, args: dict) -> str:
    # A JSON config names its phase: cuda_graph_config.prefill
    keys = (
        f"{k}.{next(iter(v))}" if isinstance(v, dict) else k for k, v in args.items()
    )
    return f"{mode}-{'-'.join(keys)}"


@pytest.mark.parametrize(
    "mode, args, what, why",
    REFUSED,
    ids=[_case_id(m, a) for m, a, _, _ in REFUSED],
)
def test_unsupported_features_are_refused(vl_model, mode, args, what, why) -> None:
    """issue: blockers items 8 and 9: a feature whose forward path ignores the received rows
    (--enable-pdmux on the language side), pipeline parallelism (no stage split of the
    received rows, so no stage builds buffers), replica DP on the encode side (every replica
    would bind the one bootstrap port), graphs asked for through the --cuda-graph-config JSON,
    and every other feature the modes do not support, refused while the arguments are
    resolved, with a message naming it."""
    with pytest.raises(ValueError) as refused:
        _resolve(vl_model, disaggregation_mode=mode, **args)
    message = str(refused.value)
    assert message.startswith(f"--disaggregation-mode {mode} does not support"), message
    assert what in message and why in message, message


def test_graph_defaults(vl_model) -> None:
    """issue: blockers item 9: encode turns every CUDA graph off (it runs no language
    forward); language turns prefill graphs off and keeps decode graphs."""
    _, encode = _resolve(vl_model, disaggregation_mode="encode")
    assert encode.disable_prefill_cuda_graph and encode.disable_decode_cuda_graph
    assert encode.cuda_graph_config.prefill.backend == "disabled"
    assert encode.cuda_graph_config.decode.backend == "disabled"
    _, language = _resolve(vl_model, disaggregation_mode="language")
    assert language.disable_prefill_cuda_graph
    assert not language.disable_decode_cuda_graph
    assert language.cuda_graph_config.prefill.backend == "disabled"
    # Asking for what the mode resolves to anyway is accepted.
    disabled = {"prefill": {"backend": "disabled"}}
    for mode in ("encode", "language"):
        _, view = _resolve(
            vl_model, disaggregation_mode=mode, cuda_graph_config=disabled
        )
        assert view.cuda_graph_config.prefill.backend == "disabled"


@pytest.mark.parametrize("mode", ["encode", "language"])
def test_supported_features_are_accepted(vl_model, mode) -> None:
    """Overlap scheduling (upstream's default; encode turns it off), on the encode side
    ``--enable-mm-global-cache``, and on the language side LoRA, HiCache and replica DP (each replica its own receiver on its own port), resolve
    without an error."""
    _, view = _resolve(vl_model, disaggregation_mode=mode)
    assert view.disable_overlap_schedule is (mode == "encode" or view.device == "cpu")
    if mode == "encode":  # rows shared across encoders (encoder_cache.py)
        _, view = _resolve(
            vl_model, disaggregation_mode=mode, enable_mm_global_cache=True
        )
        assert view.enable_mm_global_cache
    if mode == "language":
        _resolve(vl_model, disaggregation_mode=mode, enable_hierarchical_cache=True)
        _resolve(
            vl_model,
            disaggregation_mode=mode,
            enable_lora=True,
            max_lora_rank=8,
            lora_target_modules=["q_proj"],
        )
        _, view = _resolve(vl_model, disaggregation_mode=mode, dp_size=2)
        assert view.dp_size == 2


def test_language_defaults(vl_model) -> None:
    """mooncake_tcp is accepted (as mooncake over TCP); the LLM class is built from the VL
    checkpoint; the language side gets the non-VLM memory budget."""
    from sglang.srt.configs.model_config import ModelConfig

    server_args, view = _resolve(
        vl_model,
        disaggregation_mode="language",
        disaggregation_transfer_backend="mooncake_tcp",
    )
    assert view.disaggregation_transfer_backend == "mooncake"
    assert json.loads(view.json_model_override_args) == {
        "architectures": ["Qwen3MoeForCausalLM"]
    }
    model_config = ModelConfig.from_server_args(server_args)
    assert model_config.hf_config.architectures == ["Qwen3MoeForCausalLM"]
    assert model_config.hf_config.vision_config is not None  # still the VL config


def test_language_keeps_a_user_architecture(vl_model) -> None:
    override = json.dumps(
        {"architectures": ["Qwen3MoeForCausalLM"], "max_position_embeddings": 4096}
    )
    _, view = _resolve(
        vl_model, disaggregation_mode="language", json_model_override_args=override
    )
    assert view.json_model_override_args == override


def test_encode_defaults(vl_model) -> None:
    """The encode side builds the VL class vision-only and runs its own loop (no overlap)."""
    from sglang.srt.configs.model_config import ModelConfig

    server_args, view = _resolve(vl_model, disaggregation_mode="encode")
    assert view.disable_overlap_schedule is True
    model_config = ModelConfig.from_server_args(server_args)
    assert model_config.hf_config.architectures == [
        "Qwen3VLMoeForConditionalGeneration"
    ]
    assert model_config.hf_config.encoder_only is True


def test_encode_tp_is_accepted(vl_model) -> None:
    """Encode ``--tp N``: rank 0 owns the transfer, every rank runs the TP vision tower."""
    _, view = _resolve(vl_model, disaggregation_mode="encode", tp_size=2)
    assert view.tp_size == 2


@pytest.mark.parametrize(
    "mode, config, message",
    [
        (
            "encode",
            '{"bind_host": "0.0.0.0"}',
            r"--disaggregation-mode encode: bind_host in --disaggregation-mm-transfer-config "
            r"is not accepted; the control socket binds --host",
        ),
        ("language", '{"bind_hots": "0.0.0.0"}', r"unknown transfer setting\(s\)"),
    ],
    ids=["encode-bind-host", "language-unknown-key"],
)
def test_transfer_settings_are_checked_before_launch(
    vl_model, mode, config, message
) -> None:
    """issue: blockers item 5: the encode side's control socket binds --host (where the
    router's --prefill URL sends the language side); an override that could move it, and any
    bad transfer setting, is refused while the arguments are resolved, before a process starts.
    """
    with pytest.raises(ValueError, match=message):
        _resolve(
            vl_model,
            disaggregation_mode=mode,
            disaggregation_mm_transfer_config=config,
        )
