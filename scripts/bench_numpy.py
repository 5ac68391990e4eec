#!/usr/bin/env python3
"""Times numpy's matmul (best of 5) on two n x n float32 matrices; prints JSON."""
import json
import sys
import time

import numpy as np

n = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
rng = np.random.default_rng(1)
a = rng.integers(-63, 64, size=(n, n)).astype(np.float32)
b = rng.integers(-63, 64, size=(n, n)).astype(np.float32)
a @ b
best = float("inf")
for _ in range(5):
    t = time.perf_counter()
    a @ b
    best = min(best, time.perf_counter() - t)
info = {}
try:
    from threadpoolctl import threadpool_info
    info = [{k: p.get(k) for k in ("internal_api", "version", "architecture", "num_threads")} for p in threadpool_info()]
except Exception as e:  # threadpoolctl is optional
    info = str(e)
print(json.dumps({"n": n, "seconds": best, "gflops": 2 * n ** 3 / best / 1e9, "blas": info}))
