"""Benchmark of jaxsae's exact assignment against scipy's dense solver, one matrix at a time.

  .venv/bin/python bench/bench_match.py --sizes=4096,8192,16384 --instances=planted,random
  .venv/bin/python bench/bench_match.py --sizes=65536 --methods=sparse

Each (instance, size, method) runs in its own subprocess, so peak RSS is that run's alone.
Methods: `scipy` = jaxsae's blocked cosine kernel + scipy.optimize.linear_sum_assignment on the
dense matrix (what the paper's notebook does, minus its normalisation bug); `sparse` = jaxsae's
candidate + dual certificate path. Instances (d_in=576 by default, SmolLM2-135M's width):

  random   independent Gaussian unit vectors: the hardest case, few near-1 cosines
  planted  a realistic SAE pair: b is a random permutation of a plus noise (median partner
           cosine ~0.85), with 30% of b's rows replaced by unrelated vectors (orphans)

Prints one table row per run: wall seconds, peak RSS, objective, certified gap, and whether
the objective equals scipy's where scipy ran (with the speed-up).

Measured on the 2-core AMD EPYC (AVX512-BF16) dev machine, 24 GB, jax 0.10.2 CPU, scipy 1.17.1,
d_in=576, one matrix (a pair of seeds needs two: encoder and decoder), defaults (k=32,
block_size=1024, bfloat16 screening); other jobs shared the machine, so +-20%:

  instance      n  scipy dense       jaxsae sparse               gap/objective  speed-up
  planted    4096    1.8 s 0.56 GB     2.3 s 0.40 GB  3 rounds   8e-9           0.8x
  planted    8192    7.3 s 1.50 GB     3.8 s 0.45 GB  2 rounds   3e-7           1.9x
  planted   16384   31.7 s 5.29 GB    13.9 s 0.72 GB  3 rounds   9e-9           2.3x
  planted   32768  140.0 s 20.4 GB    34.6 s 1.11 GB  2 rounds   5e-7           4.0x
  planted   65536        -           138.0 s 1.89 GB  2 rounds   5e-7
  planted  131072        -           538.6 s 3.24 GB  2 rounds   7e-7
  random     4096    2.3 s 0.61 GB     1.6 s 0.41 GB  1 round    8e-9           1.5x
  random     8192    9.4 s 1.52 GB     2.7 s 0.48 GB  1 round    6e-9           3.5x
  random    16384   37.2 s 5.29 GB     8.0 s 0.65 GB  1 round    6e-9           4.7x
  random    32768  206.0 s 20.4 GB    23.9 s 1.01 GB  1 round    0              8.6x
  random    65536        -            90.2 s 1.83 GB  1 round    0

Every sparse objective equals scipy's to <= 3e-9 relative (float32 kernels summing in different
orders). scipy at 65,536 would need ~51 GB. Each full-matrix pass costs ~9-10 s at 32,768 here
(the bf16 matmul alone ~8.4 s), and a run makes 1 + rounds of them: the floor of this method on
this CPU is ~2 passes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np


def instance(kind: str, n: int, d: int, seed: int = 0):
  from jaxsae.assign import unit_rows
  rng = np.random.default_rng(seed)
  a = rng.standard_normal((n, d), dtype=np.float32)
  if kind == "random":
    return unit_rows(a), unit_rows(rng.standard_normal((n, d), dtype=np.float32))
  b = a[rng.permutation(n)]
  b += 0.6 * rng.standard_normal((n, d), dtype=np.float32)
  lost = rng.random(n) < 0.3
  b[lost] = rng.standard_normal((int(lost.sum()), d), dtype=np.float32)
  return unit_rows(a), unit_rows(b)


def child(kind: str, n: int, d: int, method: str, block_size: int, k: int) -> dict:
  from jaxsae import assign
  a, b = instance(kind, n, d)
  t0 = time.perf_counter()
  if method == "scipy":
    res = assign.assign_dense(a, b, block_size)
  else:  # sparse-full: the certificate as one pass over the full matrix per round
    res = assign.assign_sparse(a, b, k=k, block_size=block_size,
                               full_passes=method == "sparse-full")
  wall = time.perf_counter() - t0
  return {"instance": kind, "n": n, "method": method, "seconds": wall,
          "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
          "objective": res.objective, "gap": res.gap, "rounds": res.rounds,
          "candidates": res.num_candidates}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sizes", default="4096,8192,16384,32768")
  p.add_argument("--instances", default="planted,random")
  p.add_argument("--methods", default="scipy,sparse")
  p.add_argument("--d_in", type=int, default=576)
  p.add_argument("--block_size", type=int, default=1024)
  p.add_argument("--candidates", type=int, default=32)
  p.add_argument("--timeout", type=float, default=3600, help="seconds per run")
  p.add_argument("--json", default="", help="also append every result to this JSON-lines file")
  p.add_argument("--reference", default="",
                 help="a --json file of earlier runs whose scipy rows serve as the reference")
  p.add_argument("--child", default="", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    kind, n, method = args.child.split(":")
    print(json.dumps(child(kind, int(n), args.d_in, method, args.block_size, args.candidates)))
    return
  print(f"{'instance':8s} {'n':>6s} {'method':6s} {'seconds':>8s} {'peak RSS':>9s} "
        f"{'objective':>16s} {'gap':>9s} {'rounds':>6s} {'= scipy (speed-up)'}", flush=True)
  earlier = {}
  if args.reference:
    with open(args.reference) as f:
      for line in f:
        r = json.loads(line)
        if r["method"] == "scipy":
          earlier[(r["instance"], r["n"])] = r
  for kind in args.instances.split(","):
    for n in map(int, args.sizes.split(",")):
      ref = earlier.get((kind, n), {}).get("objective")
      for method in args.methods.split(","):
        cmd = [sys.executable, __file__, f"--child={kind}:{n}:{method}",
               f"--d_in={args.d_in}", f"--block_size={args.block_size}",
               f"--candidates={args.candidates}"]
        try:
          done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                                env={**os.environ, "TQDM_DISABLE": "1"})
        except subprocess.TimeoutExpired:
          print(f"{kind:8s} {n:6d} {method:6s} {'> ' + str(int(args.timeout)):>8s}  (timed out)",
                flush=True)
          continue
        if done.returncode:
          print(f"{kind:8s} {n:6d} {method:6s} failed: {done.stderr.strip()[-300:]}", flush=True)
          continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        if method == "scipy":
          ref = r["objective"]
          earlier[(kind, n)] = r
        same = "" if ref is None else (
            "yes" if abs(r["objective"] - ref) <= 1e-6 * abs(ref) else "NO")
        if (kind, n) in earlier and method != "scipy":
          same += f" ({earlier[(kind, n)]['seconds'] / r['seconds']:.1f}x)"
        gap = "-" if r["gap"] is None else f"{r['gap']:.2e}"
        print(f"{kind:8s} {n:6d} {method:6s} {r['seconds']:8.1f} {r['peak_rss_gb']:7.2f}GB "
              f"{r['objective']:16.6f} {gap:>9s} {r['rounds']:6d} {same}", flush=True)
        if args.json:
          with open(args.json, "a") as f:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
  main()
