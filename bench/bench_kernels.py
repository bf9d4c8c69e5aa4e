"""The TopK step's three paths against each other (common.choose_topk_path), shape by shape.

  python bench/bench_kernels.py --d_in=576 --k=32 --shapes=256x1024,1024x2048,4096x4096

For each batch x latents shape, one seed's whole training step (`train.make_step`: loss,
gradient, clip, Adam) with `--topk_backward` forcing each path (jaxsae's CPU kernels,
dense products, XLA's scatter-adds), timed interleaved in one process (kernel, dense, scatter,
kernel, ...; --rounds of --steps steps each), so that a busy machine slows all alike. Prints
one JSON row per shape: median ms per step of each path and each over the first.
`common.DENSE_BACKWARD_MAX` should sit between the last shape where dense beats scatter and
the first where it loses. Where the kernels run, the dense and scatter paths select with the
kernels' top-k too; JAXSAE_CPU_KERNELS=0 times XLA's own (and leaves out the kernel path).
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
_PATHS = flags.DEFINE_list("paths", ["kernel", "dense", "scatter"], "Paths to time (--topk_"
                           "backward values); kernel is skipped where the kernels do not run.")


def step_fn(batch: int, n: int, path: str):
  """(step, state, batches) of one TopK seed with its path forced."""
  import jax
  from flax import nnx
  from jaxsae import train
  cfg = train.TrainConfig(num_latents=n, k=_K.value, batch_size=batch, seeds=(0,),
                          topk_backward=path, lr=1e-3, lr_warmup_steps=10, penalty_warmup=0)
  plan = train.resolve(cfg, _D_IN.value, 1000 * batch)
  tx, _ = train.make_optimizer(plan)
  make = lambda: train.TrainState.of(plan, tx)
  graphdef, _ = nnx.split(nnx.eval_shape(make))
  step = jax.jit(train.make_step(graphdef, plan), donate_argnums=0)
  state = jax.jit(lambda: nnx.state(make()))()
  xs = np.random.default_rng(0).normal(size=(_STEPS.value, batch, _D_IN.value))
  xs = [jax.device_put(x.astype(np.float32)) for x in xs]
  state, _ = step(state, xs[0])  # compile
  jax.block_until_ready(state)
  return step, state, xs


def main(_):
  import jax
  from jaxsae import cpu_kernels
  paths = [p for p in _PATHS.value if p != "kernel" or cpu_kernels.available()]
  for shape in _SHAPES.value:
    batch, n = map(int, shape.lower().split("x"))
    sides = {path: list(step_fn(batch, n, path)) for path in paths}
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
    first = paths[0]
    print(json.dumps({"batch": batch, "num_latents": n, "batch_x_latents": batch * n,
                      **{f"{p}_ms": round(med[p], 2) for p in paths},
                      **{f"{p}_over_{first}": round(med[p] / med[first], 3) for p in paths[1:]}}),
          flush=True)


if __name__ == "__main__":
  app.run(main)
