#!/usr/bin/env python3
"""Reads the JSON files that scripts/bench wrote and prints one markdown
table: every figure beside its goal from the design."""
import json
import os
import sys

d = sys.argv[1] if len(sys.argv) > 1 else "bench-results"


def load(name):
    try:
        with open(os.path.join(d, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


c, m, mm, np_ = load("coordinator.json"), load("mesh.json"), load("matmul.json"), load("numpy.json")
acc, mm1 = load("accounts.json"), load("matmul-1.json")


def fmt(v, unit="", digits=0):
    if v is None:
        return "not measured"
    return f"{v:,.{digits}f}{unit}"


def ok(cond):
    return "" if cond is None else ("yes" if cond else "**no**")


rows = []
tickets, bare = c.get("tickets_per_s"), c.get("bare_rs256_per_s_all_threads")
rows.append(("tickets/s (/authorize with reservation, HTTP, loopback)", fmt(tickets), ">= 1,500", ok(tickets and tickets >= 1500)))
ratio = tickets / bare * 100 if tickets and bare else None
rows.append(("tickets vs bare RS256 signing on the same cores", fmt(ratio, " %"), ">= 70 %", ok(ratio and ratio >= 70)))
s_http = c.get("settlements_per_s_http")
rows.append(("receipts settled/s over HTTP (durable)", fmt(s_http), ">= 10,000", ok(s_http and s_http >= 10000)))
s_w = c.get("settlements_per_s_writer")
rows.append(("receipts settled/s in the ledger writer (group commit)", fmt(s_w), ">= 10,000", ok(s_w and s_w >= 10000)))
over = (m.get("ttft_mesh_p50_ms") - m.get("ttft_direct_p50_ms")) if m.get("ttft_mesh_p50_ms") is not None else None
rows.append(("mesh overhead on time to first token, p50", fmt(over, " ms", 2), "<= 1 ms", ok(over is not None and over <= 1)))
xover = (m.get("ttft_nginx_p50_ms") - m.get("ttft_direct_p50_ms")) if m.get("ttft_nginx_p50_ms") is not None else None
rows.append(("nginx (reverse proxy) overhead on time to first token, p50", fmt(xover, " ms", 2), "-", ""))
over99 = (m.get("ttft_mesh_p99_ms") - m.get("ttft_direct_p99_ms")) if m.get("ttft_mesh_p99_ms") is not None else None
rows.append(("mesh overhead on time to first token, p99", fmt(over99, " ms", 2), "-", ""))
cps = m.get("chunks_per_s_mesh")
rows.append(("chunks/s relayed on one stream", fmt(cps), ">= 250,000", ok(cps and cps >= 250000)))
rows.append(("chunks/s on one stream through nginx", fmt(m.get("chunks_per_s_nginx")), "-", ""))
conc = m.get("concurrent_streams")
rows.append((f"chunks/s over {conc} concurrent streams: mesh / nginx", f"{fmt(m.get('chunks_per_s_mesh_concurrent'))} / {fmt(m.get('chunks_per_s_nginx_concurrent'))}", "-", ""))
peak = m.get("worker_rss_peak_kib")
live = m.get("streams_live")
rows.append((f"worker peak memory with {live} concurrent streams", fmt(peak / 1024 if peak else None, " MiB", 1), "< 256 MiB at 1,000", ok(peak and live and live >= 1000 and peak < 256 * 1024)))
dht, gos = m.get("discovery_dht_ms"), m.get("discovery_gossip_ms")
best = min(x for x in (dht, gos) if x is not None and x == x) if (dht or gos) else None
rows.append((f"new node finds a worker among {m.get('nodes', 50)} nodes (DHT / first advert)", f"{fmt(dht, ' ms')} / {fmt(gos, ' ms')}", "< 500 ms", ok(best is not None and best < 500)))
burn, blas = mm.get("gflops"), np_.get("gflops")
rows.append(("burn matmul n = 4096 (CPU)", fmt(burn, " GFLOP/s", 1), "-", ""))
rows.append(("numpy / OpenBLAS matmul n = 4096", fmt(blas, " GFLOP/s", 1), "-", ""))
r = burn / blas * 100 if burn and blas else None
rows.append(("burn vs best BLAS on the same machine", fmt(r, " %"), ">= 90 %", ok(r and r >= 90)))
g1 = mm1.get("gflops")
rr = burn / g1 if burn and g1 else None
rows.append(("proof GFLOP/s, 4 rounds over 1 round", fmt(rr, "", 2), ">= 0.9", ok(rr and rr >= 0.9)))
sizes = acc.get("sizes") or []
p50s = [s.get("authorize_p50_ms") for s in sizes if s.get("authorize_p50_ms")]
if p50s:
    spread = max(p50s) / min(p50s)
    label = " / ".join(f"{s['accounts']:,}" for s in sizes)
    rows.append((f"/authorize p50 with {label} accounts", " / ".join(fmt(p, " ms", 2) for p in p50s), "within 1.3x", ok(spread <= 1.3)))
    big = sizes[-1]
    rows.append((f"settlements/s (writer) at {big['accounts']:,} accounts", fmt(big.get("settlements_per_s_writer")), "-", ""))
vf = mm.get("verify_fraction")
rows.append((f"verification of {mm.get('verify_rows', 132)} rows vs proving (n = 4096, {mm.get('rounds', 4)} rounds)", fmt(vf * 100 if vf is not None else None, " %", 1), "<= 5 %", ok(vf is not None and vf <= 0.05)))

print("| figure | measured | goal | met |")
print("|---|---|---|---|")
for row in rows:
    print("| " + " | ".join(row) + " |")
