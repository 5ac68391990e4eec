#!/usr/bin/env python3
"""What the evidence costs the model server (issue 25): time to first token
and tokens per second of streamed chat answers with and without
`logprobs: true, top_logprobs: 5`, alternating, in one run.

Usage: scripts/evidence_cost.py [--port P] [--runs N] [--tokens T]
Starts scripts/model_server.py (SmolLM2-135M) on a free port unless --port
names a running one. Prints a markdown table; asserts nothing.
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one(url: str, tokens: int, logprobs: bool, i: int):
    body = {
        "model": "smollm2-135m",
        "stream": True,
        "max_tokens": tokens,
        "temperature": 0,
        # A new prompt each time: no answer comes from the prompt cache.
        "messages": [{"role": "user", "content": f"Tell me about the number {i}."}],
    }
    if logprobs:
        body.update({"logprobs": True, "top_logprobs": 5})
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    t0 = time.perf_counter()
    first = None
    n = 0
    with urllib.request.urlopen(req) as r:
        for line in r:
            if not line.startswith(b"data: {"):
                continue
            ev = json.loads(line[6:])
            ch = ev.get("choices") or []
            if ch and ch[0].get("delta", {}).get("content"):
                n += 1
                if first is None:
                    first = time.perf_counter()
    end = time.perf_counter()
    rate = (n - 1) / (end - first) if first and n > 1 else float("nan")
    return (first - t0) * 1000 if first else float("nan"), rate


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    server = None
    port = args.port
    if port is None:
        port = free_port()
        here = os.path.dirname(os.path.abspath(__file__))
        server = subprocess.Popen(
            [sys.executable, os.path.join(here, "model_server.py"), "--port", str(port)],
            stdout=subprocess.DEVNULL,
        )
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        deadline = time.time() + 120
        while True:
            try:
                one(url, 1, False, 0)
                break
            except Exception:
                if time.time() > deadline:
                    raise SystemExit("the model server did not start")
                time.sleep(0.5)
        res = {False: [], True: []}
        for i in range(args.runs):
            for lp in (False, True):
                res[lp].append(one(url, args.tokens, lp, 2 * i + int(lp)))
        print(f"| streamed chat, {args.tokens} tokens, {args.runs} runs each | TTFT p50 | tokens/s p50 |")
        print("|---|---|---|")
        for lp, name in ((False, "without logprobs"), (True, "with logprobs (top 5)")):
            t = statistics.median(x[0] for x in res[lp])
            r = statistics.median(x[1] for x in res[lp])
            print(f"| {name} | {t:.1f} ms | {r:.1f} |")
    finally:
        if server:
            server.terminate()
            server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
