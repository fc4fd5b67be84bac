"""The project's main job on an embedded default: serve a generated tiny Qwen3-VL-MoE checkpoint
with the composed fork, ask it about a generated image, print the answer and the timings.

    bin/demo [--width 200 --height 120] [--question "..."] [--max-new-tokens 24]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    print("starting a colocated sglang server (fp32, torch-native CPU) ...", flush=True)
    server = servers.launch(servers.colocated_spec(model), log_dir)
    try:
        print(f"server ready on {server.url} in {server.ready_s:.1f}s (log: {server.log_path})", flush=True)
        answer, ttft, total, chunks = ask(server, args.question, images.to_data_url(image), args.max_new_tokens)
        # The tiny checkpoint has random weights: the answer is well-formed tokens, not sense.
        print(f"\nQ: {args.question}\nA: {answer!r}\n")
        print(f"timings: checkpoint {t_ckpt:.1f}s | server start {server.ready_s:.1f}s | "
              f"first token {ttft * 1000:.0f} ms | request {total * 1000:.0f} ms ({chunks} chunks)")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
