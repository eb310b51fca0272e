"""A bounded load run against `collm serve` on loopback: 1, 4, 8, ... concurrent clients, each sending a fixed
number of streamed greedy chat requests; reports throughput (completion tokens/s over the level's wall time),
p50/p95 request latency and time to first token, and counts failures.

    python bench/serve_load.py                                   # starts `collm serve` with the SmolLM2 pair
    python bench/serve_load.py --url http://127.0.0.1:8000       # against a server already running

Writes bench/results/serve_load.{json,md} (or --out). Every level is bounded: --requests per client, and no
new request after --max-seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

QUESTIONS = [
    "What is 17 times 23?", "Name three prime numbers above 50.", "Explain what a hash table is.",
    "Write a haiku about autumn.", "How many days are in a leap year?", "What causes the seasons on Earth?",
    "Give two uses of a linked list.", "Translate 'good morning' into French.", "What is the capital of Japan?",
    "Why is the sky blue?", "Describe a cat in one sentence.", "What is 144 divided by 12?",
    "List the planets of the solar system.", "What does CPU stand for?", "Tell me a fun fact about octopuses.",
    "How do you boil an egg?",
]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="An already running server; otherwise one is started on a free loopback port.")
    p.add_argument("--base", default="smollm2-135m-instruct")
    p.add_argument("--expert", default="smollm2-135m-instruct")
    p.add_argument("--head", default=None, help="Head file, 'never' or 'always' (default: zero head, P=0.5).")
    p.add_argument("--run", default=None, help="Serve this run (folder or shipped name, e.g. qwen) instead of "
                   "--base/--expert/--head.")
    p.add_argument("--dtype", default=None, help="Passed to the server it starts (e.g. bfloat16).")
    p.add_argument("--mode", default=None, help="Sent with every request: collm (default), base or expert.")
    p.add_argument("--lookahead", type=int, default=None, help="Sent with every request: draft past deferrals.")
    p.add_argument("--data", default=None, help="JSONL with a \"prompt\" per line: the questions (default: short "
                   "built-in ones).")
    p.add_argument("--threshold", type=float, default=None, help="Sent with every request (default: the server's).")
    p.add_argument("--clients", default="1,4,8", help="Comma-separated concurrency levels.")
    p.add_argument("--requests", type=int, default=4, help="Requests per client per level.")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-seconds", type=float, default=300, help="No new request after this long in a level.")
    p.add_argument("--max-concurrent", type=int, default=16, help="Passed to the server it starts.")
    p.add_argument("--out", default="bench/results/serve_load", help="Writes OUT.json and OUT.md.")
    return p.parse_args()


def start_server(args) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    models = ["--run", args.run] if args.run else ["--base", args.base, "--expert", args.expert]
    cmd = [sys.executable, "-m", "collm.cli", "serve", *models,
           "--port", str(port), "--model-name", "collm", "--max-concurrent", str(args.max_concurrent)]
    if args.head and not args.run:
        cmd += ["--head", args.head]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=sys.stderr)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("the server did not start")
        time.sleep(0.5)


async def one_request(client: httpx.AsyncClient, args, question: str) -> dict:
    body = {"model": "collm", "messages": [{"role": "user", "content": question}], "max_tokens": args.max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    for name in ("threshold", "mode", "lookahead"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    start = time.perf_counter()
    first = None
    usage = None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return {"ok": False, "error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"ok": False, "error": chunk["error"]["message"]}
                if first is None and any(c.get("provenance") for c in chunk["choices"]):
                    first = time.perf_counter() - start
                usage = chunk.get("usage") or usage
    except httpx.HTTPError as e:
        return {"ok": False, "error": repr(e)}
    if usage is None:
        return {"ok": False, "error": "no usage chunk"}
    return {"ok": True, "latency": time.perf_counter() - start, "ttft": first, "tokens": usage["completion_tokens"],
            "expert_tokens": usage["expert_tokens"]}


async def level(url: str, args, clients: int) -> dict:
    stop_at = time.monotonic() + args.max_seconds
    results: list[dict] = []

    async def client_loop(k: int):
        async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600)) as client:
            for i in range(args.requests):
                if time.monotonic() > stop_at:
                    return
                questions = args.questions
                results.append(await one_request(client, args, questions[(k * args.requests + i) % len(questions)]))

    start = time.perf_counter()
    await asyncio.gather(*(client_loop(k) for k in range(clients)))
    wall = time.perf_counter() - start
    ok = [r for r in results if r["ok"]]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "clients": clients, "requests": len(results), "failed": len(results) - len(ok),
        "errors": sorted({r["error"] for r in results if not r["ok"]})[:5], "tokens": tokens,
        "expert_tokens": sum(r["expert_tokens"] for r in ok), "wall_s": wall, "tokens_per_s": tokens / wall,
        "latency_p50": _pct([r["latency"] for r in ok], 50), "latency_p95": _pct([r["latency"] for r in ok], 95),
        "ttft_p50": _pct([r["ttft"] for r in ok if r["ttft"] is not None], 50),
        "ttft_p95": _pct([r["ttft"] for r in ok if r["ttft"] is not None], 95),
    }


def _pct(values: list[float], q: int) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def markdown(rows: list[dict]) -> str:
    one = rows[0]["tokens_per_s"] if rows else 1
    lines = ["| clients | requests | failed | tokens | expert tokens | wall s | tokens/s | × 1 client "
             "| latency p50 s | p95 s | TTFT p50 s | p95 s |", "|" + " --- |" * 12]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['requests']} | {r['failed']} | {r['tokens']} | {r['expert_tokens']} "
                     f"| {r['wall_s']:.1f} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / one:.2f} "
                     f"| {r['latency_p50']:.2f} | {r['latency_p95']:.2f} | {r['ttft_p50']:.2f} | {r['ttft_p95']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    args = parse()
    args.questions = QUESTIONS
    if args.data:  # the prompts of a data file (e.g. GSM test problems for the Qwen pair)
        args.questions = [json.loads(x)["prompt"] for x in Path(args.data).read_text().splitlines() if x.strip()]
    proc, url = (None, args.url) if args.url else start_server(args)
    try:
        asyncio.run(one_request(httpx.AsyncClient(base_url=url, timeout=600), args, "Hello"))  # warm-up
        rows = []
        for clients in (int(c) for c in args.clients.split(",")):
            rows.append(asyncio.run(level(url, args, clients)))
            print(markdown(rows).splitlines()[-1], file=sys.stderr, flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
    config = {k: v for k, v in vars(args).items() if k != "questions"}
    config |= {"threads": os.environ.get("OMP_NUM_THREADS", "default"), "cpus": os.cpu_count()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"config": config, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(markdown(rows) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
