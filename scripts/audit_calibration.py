#!/usr/bin/env python3
"""Calibrates issue 25's audit rule on real model servers, without the mesh:
answers sampled on one llama.cpp server are re-scored by forced decoding
(a grammar of the answer's token ids, temperature 0, logprobs) on another
server of the same weights but other settings (threads, --parallel), and on
a server of other weights (the cheater's case). Prints, for each pairing,
how many audits the rule fails (mean absolute logprob difference above
0.3 nats per token, the gateway's AUDIT_MEAN_NATS, or tokens the
auditor cannot force) and the largest
mean difference seen.

Usage: scripts/audit_calibration.py [--answers N] [--tokens T] [--concurrency C]
Starts its own servers with scripts/model_server.py. Asserts nothing.
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

RULE_NATS = 0.3
TOP_GAP_NATS = 1.0
HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: str, threads: int, parallel: int, alias=None):
    port = free_port()
    args = [sys.executable, os.path.join(HERE, "model_server.py"), "--model", model,
            "--port", str(port), "--threads", str(threads), "--parallel", str(parallel)]
    if alias:
        args += ["--alias", alias]
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/health") as r:
                if r.status == 200:
                    return p, url
        except Exception:
            time.sleep(0.5)
    raise SystemExit(f"{model} server did not start")


def chat(url: str, body: dict):
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    toks, error = [], None
    try:
        with urllib.request.urlopen(req) as r:
            for line in r:
                if not line.startswith(b"data: {"):
                    continue
                ev = json.loads(line[6:])
                if "error" in ev:
                    error = ev["error"].get("message", "error")
                for c in ev.get("choices", []):
                    for t in (c.get("logprobs") or {}).get("content") or []:
                        top = [(a["id"], a["logprob"]) for a in t.get("top_logprobs") or []]
                        toks.append((t["id"], t["logprob"], top))
    except urllib.error.HTTPError as e:
        error = f"HTTP {e.code}"
    return toks, error


PROMPTS = ["Name a colour and the number {i}.", "Write one sentence about the sea ({i}).",
           "What is {i} plus 3?", "Give a word that rhymes with cat, then count to {i}."]


def answer(url: str, model: str, i: int, tokens: int):
    msgs = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)].format(i=i)}]
    toks, _ = chat(url, {"model": model, "stream": True, "max_tokens": tokens, "temperature": 0.8,
                         "seed": i, "logprobs": True, "top_logprobs": 5, "messages": msgs})
    return msgs, toks


def audit(url: str, model: str, msgs, toks):
    grammar = "root ::= " + " ".join(f"<[{t[0]}]>" for t in toks)
    theirs, error = chat(url, {"model": model, "stream": True, "max_tokens": len(toks), "temperature": 0,
                               "logprobs": True, "top_logprobs": 5, "grammar": grammar, "messages": msgs})
    if error or len(theirs) != len(toks) or any(a[0] != b[0] for a, b in zip(toks, theirs)):
        return None, 0  # cannot force: fails
    mean = sum(abs(a[1] - b[1]) for a, b in zip(toks, theirs)) / max(1, len(toks))
    return mean, top_off(toks, theirs)


def top_off(mine, theirs):
    """Places where the served likeliest token is not the auditor's and the
    auditor finds it more than TOP_GAP_NATS below its own (the gateway's rule)."""
    off = 0
    for a, b in zip(mine, theirs):
        if not a[2] or not b[2] or a[2][0][0] == b[2][0][0]:
            continue
        claimed = a[2][0][0]
        lp = b[1] if b[0] == claimed else next((l for i, l in b[2] if i == claimed), None)
        if lp is None or b[2][0][1] - lp > TOP_GAP_NATS:
            off += 1
    return off


def run(name, served, auditor, n, tokens, conc):
    model = "smollm2-135m"

    def one(i):
        msgs, toks = answer(served, model, i, tokens)
        return audit(auditor, model, msgs, toks) if toks else (0.0, 0)

    with ThreadPoolExecutor(conc) as ex:
        found = list(ex.map(one, range(n)))
    means = [m for m, _ in found]
    tops = sum(1 for m, off in found if m is not None and m <= RULE_NATS and off > 0)
    failed = sum(1 for m, off in found if m is None or m > RULE_NATS or off > 0)
    forced = sorted(m for m in means if m is not None)
    worst = forced[-1] if forced else float("nan")
    p99 = forced[min(len(forced) - 1, int(0.99 * len(forced)))] if forced else float("nan")
    unforced = n - len(forced)
    print(f"| {name} | {n} | {failed} ({100 * failed / n:.1f} %) | {unforced} | {tops} | {p99:.2e} / {worst:.2e} |", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--answers", type=int, default=250)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--concurrency", type=int, default=4)
    a = ap.parse_args()
    procs = []
    try:
        s1, u_s1 = start("smollm2", 1, 2)
        s2, u_s2 = start("smollm2", 2, 4)
        g1, u_g1 = start("gemma", 1, 2, alias="smollm2-135m")
        g2, u_g2 = start("gemma", 2, 4, alias="smollm2-135m")
        procs = [s1, s2, g1, g2]
        print(f"audit rule: fail above {RULE_NATS} nats per token on average, or tokens that cannot be forced")
        print(f"audit rule: also fail where the served likeliest token is over {TOP_GAP_NATS} nats below the auditor's")
        print("| served by -> audited by | answers | failed | could not force | failed by the likeliest token alone | mean difference p99 / largest (nats/token) |")
        print("|---|---|---|---|---|---|")
        n, t, c = a.answers, a.tokens, a.concurrency
        run("SmolLM2 (1 thread, parallel 2) -> SmolLM2 (2 threads, parallel 4)", u_s1, u_s2, n, t, c)
        run("SmolLM2 (2 threads, parallel 4) -> SmolLM2 (1 thread, parallel 2)", u_s2, u_s1, n, t, c)
        run("Gemma (1 thread, parallel 2) -> Gemma (2 threads, parallel 4)", u_g1, u_g2, n, t, c)
        run("Gemma (2 threads, parallel 4) -> Gemma (1 thread, parallel 2)", u_g2, u_g1, n, t, c)
        run("cheater: Gemma as SmolLM2 -> SmolLM2", u_g1, u_s1, max(50, n // 5), t, c)
    finally:
        for p in procs:
            p.terminate()
            p.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
