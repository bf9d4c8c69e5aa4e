"""Where the TopK kernels' dense-product backward beats the scatter-add one (common.py).

  python bench/bench_kernels.py --d_in=576 --k=32 --shapes=256x1024,1024x2048,4096x4096

For each batch x latents shape, one seed's whole training step (`train.make_step`: loss,
gradient, clip, Adam) with `SaeConfig.topk_backward` forcing each path, timed interleaved in
one process (dense, scatter, dense, ...; --rounds of --steps steps each), so that a busy
machine slows both alike. Prints one JSON row per shape: median ms per step of each path and
their ratio; `common.DENSE_BACKWARD_MAX` should sit between the last shape where dense wins and
the first where it loses.
"""

from __future__ import annotations

import json
import time

from absl import app
from absl import flags
import numpy as np

_D_IN = flags.DEFINE_integer("d_in", 576, "Input width.")
_K = flags.DEFINE_integer("k", 32, "Active latents per token.")
_SHAPES = flags.DEFINE_list("shapes", ["256x1024", "512x2048", "1024x4096", "4096x4096"],
                            "BATCHxLATENTS shapes to time.")
_STEPS = flags.DEFINE_integer("steps", 10, "Steps per timed round.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Interleaved rounds per path.")


def step_fn(batch: int, n: int, dense: bool):
  """(step, state, batches) of one TopK seed with the backward forced to `dense` or not."""
  import jax
  from flax import nnx
  from jaxsae import train
  from jaxsae.sae import ARCHITECTURES, SaeConfig
  cfg = train.TrainConfig(num_latents=n, k=_K.value, batch_size=batch)
  tx, _ = train.make_optimizer(1e-3, 10, 1000, cfg)
  make = lambda: train.TrainState(ARCHITECTURES["topk"], (0,), _D_IN.value, n,
                                  SaeConfig(k=_K.value, topk_backward="dense" if dense else "scatter"), tx)
  graphdef, _ = nnx.split(nnx.eval_shape(make))
  step = jax.jit(train.make_step(graphdef, cfg, 0, "map"), donate_argnums=0)
  state = jax.jit(lambda: nnx.state(make()))()
  xs = np.random.default_rng(0).normal(size=(_STEPS.value, batch, _D_IN.value))
  xs = [jax.device_put(x.astype(np.float32)) for x in xs]
  state, _ = step(state, xs[0])  # compile
  jax.block_until_ready(state)
  return step, state, xs


def main(_):
  import jax
  for shape in _SHAPES.value:
    batch, n = map(int, shape.lower().split("x"))
    sides = {"dense": list(step_fn(batch, n, True)), "scatter": list(step_fn(batch, n, False))}
    times = {name: [] for name in sides}
    for _ in range(_ROUNDS.value):
      for name, side in sides.items():
        step, state, xs = side
        t = time.perf_counter()
        for x in xs:
          state, _ = step(state, x)
        jax.block_until_ready(state)
        times[name].append((time.perf_counter() - t) / len(xs) * 1e3)
        side[1] = state
    med = {name: float(np.median(t)) for name, t in times.items()}
    print(json.dumps({"batch": batch, "num_latents": n, "batch_x_latents": batch * n,
                      "dense_ms": round(med["dense"], 2), "scatter_ms": round(med["scatter"], 2),
                      "scatter_over_dense": round(med["scatter"] / med["dense"], 3)}),
          flush=True)


if __name__ == "__main__":
  app.run(main)
