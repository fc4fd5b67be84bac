"""The project's main job on an embedded default: serve a generated tiny Qwen3-VL-MoE checkpoint
with the composed fork, ask it about a generated image, print the answer and the timings.

By default the deployment is disaggregated: sglang-router (PD mode) in front of an encode server
(vision tower only) and a language server; the demo also prints the bytes the encode server sent
and whether the answer equals the Hugging Face fp32 reference. ``--colocated`` runs one server.

    bin/demo [--colocated] [--width 200 --height 120] [--question "..."] [--max-new-tokens 24]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
import urllib.request
from pathlib import Path

from epd_testbed import images, servers
from epd_testbed.tiny_ckpt import TinyVLMoeSpec, ensure_checkpoint


def ask(server: servers.Server, question: str, image_url: str, max_new_tokens: int) -> tuple[str, float, float, int]:
    """Streamed OpenAI chat completion: (answer, time to first token, total, chunks)."""
    payload = {
        "model": "default",
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_url}},
            {"type": "text", "text": question},
        ]}],
        "temperature": 0,
        "max_tokens": max_new_tokens,
        "stream": True,
    }
    req = urllib.request.Request(server.url + "/v1/chat/completions", data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.time()
    ttft, parts = None, []
    with urllib.request.urlopen(req, timeout=300) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            delta = json.loads(line[5:])["choices"][0]["delta"].get("content") or ""
            if delta and ttft is None:
                ttft = time.time() - t0
            parts.append(delta)
    return "".join(parts), ttft or 0.0, time.time() - t0, len(parts)


def hf_answer(model: Path, question: str, image: Path, max_new_tokens: int) -> str:
    """The Hugging Face fp32 greedy answer to the same chat (the reference)."""
    from epd_testbed.hf_reference import _tok_and_proc, hf_greedy

    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": str(image)}},
        {"type": "text", "text": question},
    ]}]
    tokens = hf_greedy(model, messages, max_new_tokens)
    tokenizer, _ = _tok_and_proc(model)
    return tokenizer.decode(tokens, skip_special_tokens=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--colocated", action="store_true", help="one colocated server instead of router + encode + language")
    ap.add_argument("--width", type=int, default=200)
    ap.add_argument("--height", type=int, default=120)
    ap.add_argument("--question", default="What shapes and colors are in this picture?")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    args = ap.parse_args()

    t = time.time()
    model = ensure_checkpoint(TinyVLMoeSpec())
    t_ckpt = time.time() - t
    image = images.save_image(args.width, args.height, seed=1)
    print(f"checkpoint: {model}  ({t_ckpt:.1f}s)\nimage:      {image} ({args.width}x{args.height})", flush=True)

    log_dir = Path(tempfile.mkdtemp(prefix="epd-demo-"))
    if args.colocated:
        print("starting a colocated sglang server (fp32, torch-native CPU) ...", flush=True)
        server = servers.launch(servers.colocated_spec(model), log_dir)
        group = [server]
        starts = f"server start {server.ready_s:.1f}s"
    else:
        print("starting an encode server, a language server and sglang-router (fp32, torch-native CPU) ...",
              flush=True)
        router, encoder, language = servers.launch_encode_language(model, log_dir)
        server, group = router, [router, encoder, language]
        starts = (f"encode server start {encoder.ready_s:.1f}s | language server start {language.ready_s:.1f}s "
                  f"| router {router.ready_s:.1f}s")
    try:
        for s in group:
            print(f"{s.spec.name} on {s.url} (log: {s.log_path})", flush=True)
        answer, ttft, total, chunks = ask(server, args.question, images.to_data_url(image), args.max_new_tokens)
        print(f"\nQ: {args.question}\nA: {answer!r}")
        print("(the tiny checkpoint has random weights: the answer is nonsense words by design)\n")
        print(f"timings: checkpoint {t_ckpt:.1f}s | {starts} | first token {ttft * 1000:.0f} ms | "
              f"request {total * 1000:.0f} ms ({chunks} chunks)")
        if not args.colocated:
            m = servers.encode_language_metrics(encoder)
            print(f"transfer: {int(m.get('bytes', 0))} bytes in {int(m.get('rounds', 0))} round(s) "
                  f"sent by the encode server in {m.get('transfer_seconds', 0) * 1000:.0f} ms "
                  f"(last request); {int(m.get('requests.success', 0))} request(s) transferred")
        reference = hf_answer(model, args.question, image, args.max_new_tokens)
        print(f"equal to the Hugging Face fp32 reference: {answer == reference}")
        if answer != reference:
            print(f"HF: {reference!r}")
    finally:
        for s in group:
            s.stop()


if __name__ == "__main__":
    main()
