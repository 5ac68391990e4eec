"""Reads `troop bench --json` lines on stdin and prints a markdown table;
exits 1 when two backends gave different roots for the same challenge."""
import json
import sys

rows = [json.loads(line) for line in sys.stdin if line.strip()]
roots = {}
print("| asked | proved on | n | rounds | GFLOP/s | matmul s | total s | root |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    asked, n, rounds = r["asked"], r["n"], r["rounds"]
    if r.get("error"):
        print(f"| {asked} | failed (run troop bench --backend {asked}) | {n} | {rounds} | | | | |")
        continue
    adapter = r.get("adapter")
    where = r["backend"] + (f" ({adapter['name']})" if adapter else "")
    if r.get("fallback"):
        where += " after a fallback"
    roots.setdefault((n, rounds), set()).add(r["root"])
    print(
        f"| {asked} | {where} | {n} | {rounds} | {r['gflops']:.1f} | "
        f"{r['matmul_seconds']:.3f} | {r['seconds']:.3f} | {r['root'][:12]} |"
    )
same = all(len(v) == 1 for v in roots.values())
print()
print("roots equal across backends at each size:", "yes" if same else "NO")
sys.exit(0 if same else 1)
