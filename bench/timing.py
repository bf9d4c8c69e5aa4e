"""The interleaved timing the part-by-part benchmarks share."""

from __future__ import annotations

import time

import numpy as np


def interleaved_ms(fns: dict, rounds: int, calls: int) -> dict[str, float]:
  """{name: median ms per call} of jitted `f(*args)` for each name: (f, args) of `fns`, after
  one warm-up call each; the functions take turns round by round, so a busy machine slows
  them alike."""
  import jax

  for f, args in fns.values():
    jax.block_until_ready(f(*args))
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, (f, args) in fns.items():
      t = time.perf_counter()
      for _ in range(calls):
        out = f(*args)
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - t) / calls * 1e3)
  return {name: float(np.median(t)) for name, t in times.items()}
