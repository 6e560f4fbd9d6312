"""`dmclip compress serve` under load: `dmclip.compress.load.run_load` against a server on 127.0.0.1.

The server's model: a BLIP of the CPU-scale recipe's architecture (recipes/pretrain-blip.yaml: 32 px,
patch 4, so 64 patch tokens + 1 class token of width 128; text 128 x 3), untrained weights, beam search with
the default decode settings (3 beams, at most 30 tokens). Requests: one image each, k-means k = 8 shaped,
float16 (2,353 bytes). Rows: requests/s and latency for 1, 4 and 16 clients with batching (up to 32 images
per decoder call, waiting 2 ms for more; at 4 clients also without the wait) and, at 16 clients, without
(one request per call); the same against a captioner of the
same shapes that computes nothing (the cost of the link, the checks and the queue); and the time to refuse
the 537-byte payload that claims 2^20 patch tokens (k-means, K = 1).

    python -m benchmarks.bench_serve            # prints the rows
"""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks.common import repeats

CLIENTS = (1, 4, 16)
ARCH = {"image_size": 32, "patch_size": 4, "vision_width": 128, "vision_depth": 4, "vision_heads": 4,
        "text_width": 128, "text_depth": 3, "text_heads": 4, "embed_dim": 128, "context_length": 24,
        "queue_size": 64}


def _model():
    from dmclip.models.blip import BlipModel

    torch.manual_seed(0)
    return BlipModel(**ARCH).eval()


class _Echo:
    """The BLIP's shapes without its compute: what the link, the checks and the queue cost alone."""

    image_size = ARCH["image_size"]

    def encode_image_tokens(self, images):
        return torch.zeros(images.shape[0], 65, ARCH["vision_width"])

    def generate(self, image_tokens=None, **kw):
        return ["a caption"] * image_tokens.shape[0]


def _attack(width: int) -> bytes:
    from dmclip.compress.codec import Payload, encode, quantize

    n = 2**20
    vectors, _ = quantize(torch.rand(1, 1, width), "float16")
    cls, _ = quantize(torch.rand(1, width), "float16")
    return encode(Payload("kmeans", n, vectors, None, cls, None, torch.zeros(1, n, dtype=torch.long)))


def _refusal_ms(port: int, tries: int) -> tuple[float, float, int]:
    from dmclip.compress.client import LinkClient

    body, times = _attack(ARCH["vision_width"]), []
    with LinkClient(("127.0.0.1", port), timeout=30) as client:
        for _ in range(tries):
            start = time.monotonic()
            reply = client.request(body)["reply"]
            times.append(1000 * (time.monotonic() - start))
            assert reply["ok"] is False and "expected 65" in reply["error"], reply
    return statistics.median(times), max(times), len(body)


def measure(requests: int = 8, echo_requests: int = 50) -> list[dict]:
    from dmclip.compress.config import DecodeConfig
    from dmclip.compress.endpoints import caption_handler
    from dmclip.compress.load import run_load
    from dmclip.compress.server import CaptionServer

    blip, echo = caption_handler(_model(), DecodeConfig()), caption_handler(_Echo(), DecodeConfig())
    rows = []
    plan = [("tiny BLIP", blip, c, 32, 2.0, requests) for c in CLIENTS]
    plan += [("tiny BLIP", blip, CLIENTS[1], 32, 0.0, requests), ("tiny BLIP", blip, CLIENTS[-1], 1, 2.0, requests)]
    plan += [("echo (no model compute)", echo, c, 32, 2.0, echo_requests) for c in CLIENTS]
    for model, handler, clients, batch_images, wait_ms, count in plan:
        with CaptionServer(handler, batch_images=batch_images, batch_wait=wait_ms / 1000,
                           max_connections=max(CLIENTS)) as server:
            result = run_load(("127.0.0.1", server.port), clients, count, timeout=120, time_limit=300)
            stats = server.stats.as_dict()
        rows.append({"model": model, "clients": clients, "batch_images": batch_images, "batch_wait_ms": wait_ms,
                     **result, "images_per_call": stats["mean_images_per_decoder_call"]})
    with CaptionServer(handler) as server:
        median, worst, size = _refusal_ms(server.port, 20)
    rows.append({"refusal_median_ms": median, "refusal_max_ms": worst, "attack_bytes": size})
    return rows


def main() -> list[dict]:
    rows = measure(requests=max(2, repeats(8)), echo_requests=max(2, repeats(50)))
    out = []
    for r in rows[:-1]:
        lost = r["errors"] + r["mismatched"] + r["lost"] + r["not_sent"]
        out.append({"benchmark": f"compress serve, {r['model']}, {r['clients']} clients x {r['requests_per_client']} "
                                 f"requests, batch_images={r['batch_images']}, batch_wait={r['batch_wait_ms']:g} ms",
                    "value": f"{r['requests_per_s']:.1f} req/s, p50 {r['p50_ms']:.0f} ms, p95 {r['p95_ms']:.0f} ms, "
                             f"p99 {r['p99_ms']:.0f} ms",
                    "baseline": "", "ratio": None, "goal": "no lost or mismatched replies", "met": lost == 0,
                    "notes": f"{r['bytes_per_s']:,.0f} bytes/s, {r['images_per_call']:.1f} images per decoder call, "
                             f"{lost} errors/lost"})
    last = rows[-1]
    out.append({"benchmark": f"refuse a {last['attack_bytes']}-byte payload claiming 2^20 tokens (20 tries)",
                "value": f"median {last['refusal_median_ms']:.2f} ms, max {last['refusal_max_ms']:.2f} ms",
                "baseline": "", "ratio": None, "goal": "< 50 ms", "met": last["refusal_max_ms"] < 50, "notes": ""})
    return out


if __name__ == "__main__":
    for row in main():
        print(f"| {row['benchmark']} | {row['value']} | {row['notes']} | met: {row['met']} |")
