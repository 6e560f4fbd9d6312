"""`dmclip compress`: edge -> server captioning with vision-token compression (eval, sweep, serve, send)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dmclip.cli.common import NameOpt, RecipeArg, RunsDirOpt, SeedOpt, SetOpt, console, err_console, launch

ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="BLIP model: run:<pretrain run dir>.")]
SelectorOpt = Annotated[str | None, typer.Option(
    "--selector", help="none | kmeans | random | topk-norm | pool | tome (`dmclip list selectors`).")]
KOpt = Annotated[int | None, typer.Option("--k", help="k-means centroids sent per image.")]
FractionOpt = Annotated[float | None, typer.Option("--fraction", help="Kept fraction (random, topk-norm, tome).")]
PoolOpt = Annotated[int | None, typer.Option("--pool-size", help="Pooling window side (pool).")]
DtypeOpt = Annotated[str | None, typer.Option("--dtype", help="Wire dtype: float16 | float32 | int8.")]
LimitOpt = Annotated[int | None, typer.Option("--limit", help="Test images captioned (0 = all).")]


def _shortcuts(model, selector, k, fraction, pool_size, dtype, limit, seed, **extra) -> dict:
    return {"model": model, "selector": selector, "k": k, "fraction": fraction, "pool_size": pool_size,
            "dtype": dtype, "limit": limit, "seed": seed, **extra}


def _execute(run, **kwargs):
    """(run directory, result) of one `compress` run of ``run(config, run_dir)`` through the runner."""
    from dmclip.compress.config import CompressConfig
    from dmclip.runner import Command

    outcome = launch(Command("compress", CompressConfig, run), **kwargs)
    return outcome.run_dir, outcome.result


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="Edge -> server captioning with vision-token compression (k-means and friends).\n\n"
                             "Example: dmclip compress eval --model run:runs/pretrain/<run> --selector kmeans --k 8",
                        no_args_is_help=True)
    app.add_typer(group, name="compress")

    @group.command("eval")
    def eval_command(recipe: RecipeArg = None, model: ModelOpt = None, selector: SelectorOpt = None, k: KOpt = None,
                     fraction: FractionOpt = None, pool_size: PoolOpt = None, dtype: DtypeOpt = None,
                     limit: LimitOpt = None, seed: SeedOpt = None,
                     finetune_server: Annotated[bool, typer.Option(
                         "--finetune-server", help="Fine-tune the server decoder on compressed tokens first.")] = False,
                     sets: SetOpt = None, name: NameOpt = None, runs_dir: RunsDirOpt = None) -> None:
        """Caption a test split through a selector; BLEU-1..4, CIDEr, ratio to all tokens, bytes, times.

        Example: dmclip compress eval --model run:runs/pretrain/<run> --selector kmeans --k 8
        """
        from dmclip.cli.common import metrics_table
        from dmclip.compress.pipeline import run_eval
        from dmclip.compress.summary import COLUMNS

        shortcuts = _shortcuts(model, selector, k, fraction, pool_size, dtype, limit, seed,
                               **({"finetune.enabled": True} if finetune_server else {}))
        run, result = _execute(run_eval, recipe=recipe, sets=sets, shortcuts=shortcuts,
                              name=name or f"eval-{selector or 'kmeans'}", runs_dir=runs_dir)
        console.print(metrics_table("compress eval", result["rows"], ["label", "communication_efficiency", "bytes_per_image",
                                                            "bleu1", "bleu4", "cider", "bleu4_ratio", "edge_ms",
                                                            "server_ms"], fmt="{:.1f}", percent=True, labels=COLUMNS))
        console.print(f"report (with intervals): {run.path / 'report.md'}")

    @group.command("sweep")
    def sweep_command(recipe: RecipeArg = None, model: ModelOpt = None, limit: LimitOpt = None,
                      dtype: DtypeOpt = None, seed: SeedOpt = None, sets: SetOpt = None, name: NameOpt = None,
                      runs_dir: RunsDirOpt = None) -> None:
        """Sweep k / fractions / pool sizes for every selector: table (md + csv) and a plot vs bytes sent.

        Example: dmclip compress sweep --model run:runs/pretrain/<run> --set sweep.k=[1,4,16]
        """
        from dmclip.compress.pipeline import run_sweep

        shortcuts = _shortcuts(model, None, None, None, None, dtype, limit, seed)
        run, result = _execute(run_sweep, recipe=recipe, sets=sets, shortcuts=shortcuts,
                              name=name or "sweep", runs_dir=runs_dir)
        console.print((run.path / "summary.md").read_text())
        for claim in result["claims"]:
            console.print(f"- {claim}")
        console.print(f"plot: {result['plot']}")

    @group.command("serve")
    def serve_command(model: ModelOpt = None,
                      port: Annotated[int, typer.Option("--port", "-p", help="TCP port (0 = any free one).")] = 5000,
                      host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
                      max_requests: Annotated[int | None, typer.Option(
                          "--max-requests", help="Stop after this many frames.")] = None,
                      idle_timeout: Annotated[float | None, typer.Option(
                          "--idle-timeout", help="Stop after this many seconds without a connection.")] = None,
                      max_connections: Annotated[int, typer.Option(
                          "--max-connections", help="Connections served at once; the next gets a 'busy' reply.",
                          min=1)] = 16,
                      connection_timeout: Annotated[float, typer.Option(
                          "--connection-timeout", help="Seconds a connection may send nothing, or take to send "
                          "one frame, before it gets an error reply and is closed.", min=0.01)] = 30.0,
                      max_batch: Annotated[int, typer.Option(
                          "--max-batch", help="Images one request may carry.", min=1)] = 16,
                      batch_images: Annotated[int, typer.Option(
                          "--batch-images", help="Most images of concurrent requests captioned in one "
                          "decoder call.", min=1)] = 32,
                      batch_wait_ms: Annotated[float, typer.Option(
                          "--batch-wait-ms", help="How long the model waits for more requests once it has one.",
                          min=0.0, max=1000.0)] = 2.0,
                      sets: SetOpt = None, name: NameOpt = None, runs_dir: RunsDirOpt = None) -> None:
        """Run the server half: receive payloads, restore tokens, caption, reply (Ctrl-C stops).

        Example: dmclip compress serve --model run:runs/pretrain/<run> --port 5000
        """
        from dmclip.compress.endpoints import caption_handler
        from dmclip.compress.model import load_compress_model
        from dmclip.compress.server import CaptionServer

        def serve(cfg, run):
            captioner = load_compress_model(cfg.model)
            handler = caption_handler(captioner, cfg.decode, max_batch=max_batch)
            server = CaptionServer(handler, host, port, max_requests=max_requests, idle_timeout=idle_timeout,
                                   max_connections=max_connections, connection_timeout=connection_timeout,
                                   batch_images=batch_images, batch_wait=batch_wait_ms / 1000)
            accepts = handler.accepts
            err_console.print(f"serving on {server.host}:{server.port} (payloads of {accepts.tokens} tokens x "
                              f"{accepts.width}, at most {accepts.max_batch} images per request, "
                              f"{max_connections} connections)")
            try:
                stats = server.serve().as_dict()
            except KeyboardInterrupt:  # Ctrl-C (or SIGTERM) is how a server is stopped: the run ends normally
                stats = server.stats.as_dict()
                err_console.print("server stopped", highlight=False)
            finally:
                run.write_results(server.stats.as_dict())
            run.write_text("report.md", "# compress serve\n\n" + "".join(f"- {k}: {v}\n" for k, v in stats.items()))
            return stats

        _, stats = _execute(serve, sets=sets, shortcuts={"model": model},
                           name=name or "serve", runs_dir=runs_dir)
        console.print(stats)

    @group.command("load")
    def load_command(server: Annotated[str, typer.Option("--server", help="host:port of `compress serve` "
                                                         "(loopback only).")],
                     clients: Annotated[int, typer.Option("--clients", help="Concurrent connections.")] = 4,
                     requests: Annotated[int, typer.Option("--requests", help="Requests per client.")] = 20,
                     k: KOpt = None, dtype: DtypeOpt = None, seed: SeedOpt = None,
                     time_limit: Annotated[float, typer.Option(
                         "--time-limit", help="Stop sending after this many seconds.")] = 60.0,
                     timeout: Annotated[float, typer.Option(
                         "--timeout", help="Seconds to wait for one reply.")] = 30.0,
                     sets: SetOpt = None, name: NameOpt = None, runs_dir: RunsDirOpt = None) -> None:
        """Load-test a server on this machine: requests/s, p50/p95/p99 latency, bytes/s, errors.

        Each client sends k-means-shaped payloads that fit the server's model (it asks the server first).

        Example: dmclip compress load --server 127.0.0.1:5000 --clients 4 --requests 20
        """
        from dmclip.compress.load import check_bounds, loopback_address, run_load

        address = loopback_address(server)  # both before a run directory is made
        check_bounds(clients, requests, time_limit, timeout)

        def load(cfg, run):
            result = run_load(address, clients, requests, k=cfg.k, dtype=cfg.dtype, seed=cfg.seed, timeout=timeout,
                              time_limit=time_limit)
            run.write_results(result)
            run.write_text("report.md", "# compress load\n\n" + "".join(
                f"- {key}: {value}\n" for key, value in result.items() if key != "server_info"))
            return result

        _, result = _execute(load, sets=sets, shortcuts={"k": k, "dtype": dtype,
                                                                                   "seed": seed},
                            name=name or "load", runs_dir=runs_dir)
        r = result
        console.print(f"{r['ok']} of {r['clients'] * r['requests_per_client']} requests answered ok "
                      f"({r['errors']} errors, {r['mismatched']} mismatched, {r['lost']} lost, {r['not_sent']} not "
                      f"sent) by {r['server']} in {r['seconds']:.2f} s, {r['clients']} clients")
        if r["replies"]:
            console.print(f"{r['requests_per_s']:.1f} requests/s | latency p50 {r['p50_ms']:.1f} ms, p95 "
                          f"{r['p95_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms | {r['bytes_per_s']:,.0f} bytes/s")
        for message, count in result["error_messages"].items():
            err_console.print(f"{count} x {message}")

    @group.command("send")
    def send_command(images: Annotated[list[Path], typer.Argument(help="Image files (PNG/JPEG) to caption.")],
                     server: Annotated[str, typer.Option("--server", help="host:port of `compress serve`.")],
                     model: ModelOpt = None, selector: SelectorOpt = None, k: KOpt = None,
                     fraction: FractionOpt = None, pool_size: PoolOpt = None, dtype: DtypeOpt = None,
                     seed: SeedOpt = None, sets: SetOpt = None, name: NameOpt = None,
                     runs_dir: RunsDirOpt = None) -> None:
        """Run the edge half: encode and compress each image, send it, print the caption, bytes and latency.

        Example: dmclip compress send --server 127.0.0.1:5000 --model run:runs/pretrain/<run> a.png b.png
        """
        from dmclip.compress.config import selector_from_config
        from dmclip.compress.endpoints import load_images, send_images
        from dmclip.compress.model import load_compress_model

        def send(cfg, run):
            edge = load_compress_model(cfg.model)
            rows = send_images(edge, selector_from_config(cfg), load_images(images, edge.image_size), server,
                               names=[str(p) for p in images])
            result = {"server": server, "images": rows,
                      "mean_payload_bytes": sum(r["payload_bytes"] for r in rows) / len(rows),
                      "mean_rtt_ms": sum(r["rtt_ms"] for r in rows) / len(rows)}
            run.write_results(result)
            run.write_text("report.md", "# compress send\n\n| image | caption | bytes | rtt ms |\n|---|---|---|---|\n"
                           + "".join(f"| {r['image']} | {r['caption']} | {r['wire_bytes_sent']} | {r['rtt_ms']:.1f} |\n"
                                     for r in rows))
            return result

        shortcuts = _shortcuts(model, selector, k, fraction, pool_size, dtype, None, seed)
        _, result = _execute(send, sets=sets, shortcuts=shortcuts, name=name or "send",
                            runs_dir=runs_dir)
        from dmclip.cli.common import metrics_table

        console.print(metrics_table("compress send", result["images"],
                                    ["image", "caption", "wire_bytes_sent", "rtt_ms", "edge_ms", "server_ms"]))
