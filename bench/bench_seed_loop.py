"""How the step should run its seeds on this machine: batched (vmap), unrolled in turn, or in
turn as a lax.map (train.step.over_seeds), for one architecture and shape.

  python bench/bench_seed_loop.py --arch=topk --batch_size=256 --num_latents=1024 --seeds=4

The whole training step (`train.make_step`: loss, gradient, clip, Adam, the guard) on the same
state and batch under each loop, the loops interleaved round by round; median ms per step.
`train.plan.seed_loop` encodes what this measured (see BENCHMARKS.md); JAXSAE_CPU_KERNELS=0 times
XLA's own paths.
"""

from __future__ import annotations

import json
import time

from absl import app
from absl import flags
import numpy as np

_ARCH = flags.DEFINE_string("arch", "topk", "Architecture (jaxsae train --arch).")
_B = flags.DEFINE_integer("batch_size", 256, "Tokens per batch.")
_N = flags.DEFINE_integer("num_latents", 1024, "Latents per SAE.")
_D_IN = flags.DEFINE_integer("d_in", 576, "Input width.")
_K = flags.DEFINE_integer("k", 32, "Active latents per token.")
_SEEDS = flags.DEFINE_integer("seeds", 4, "Seeds in the step.")
_BACKWARD = flags.DEFINE_string("topk_backward", "auto", "jaxsae train --topk_backward.")
_LOOPS = flags.DEFINE_list("loops", ["vmap", "unrolled", "lax_map"], "Loops to time.")
_STEPS = flags.DEFINE_integer("steps", 20, "Steps per round.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Interleaved rounds.")

# The plan's (seed_loop, unroll_seeds) for each loop.
LOOPS = {"vmap": ("vmap", False), "unrolled": ("map", True), "lax_map": ("map", False)}


def main(_):
  import dataclasses

  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jaxsae import train

  b, n, d = _B.value, _N.value, _D_IN.value
  cfg = train.TrainConfig(arch=_ARCH.value, num_latents=n, k=_K.value, batch_size=b,
                          seeds=tuple(range(_SEEDS.value)), topk_backward=_BACKWARD.value,
                          lr=1e-3, lr_warmup_steps=10, penalty_warmup=0)
  plan = train.resolve(cfg, d, 1000 * b)
  tx, _ = train.make_optimizer(plan)
  make = lambda: train.TrainState.of(plan, tx)
  graphdef, _ = nnx.split(nnx.eval_shape(make))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(b, d)).astype(np.float32))
  steps, states = {}, {}
  for name in _LOOPS.value:
    loop, unroll = LOOPS[name]
    forced = dataclasses.replace(plan, execution=dataclasses.replace(
        plan.execution, seed_loop=loop, unroll_seeds=unroll))
    steps[name] = jax.jit(train.make_step(graphdef, forced), donate_argnums=0)
    states[name], _ = steps[name](jax.jit(lambda: nnx.state(make()))(), x)
    jax.block_until_ready(states[name])
  times = {name: [] for name in steps}
  for _ in range(_ROUNDS.value):
    for name, step in steps.items():
      state = states[name]
      t = time.perf_counter()
      for _ in range(_STEPS.value):
        state, _ = step(state, x)
      jax.block_until_ready(state)
      times[name].append((time.perf_counter() - t) / _STEPS.value * 1e3)
      states[name] = state
  chosen = plan.execution.seed_loop
  print(json.dumps({"arch": _ARCH.value, "batch_size": b, "num_latents": n, "seeds": _SEEDS.value,
                    "topk_backward": _BACKWARD.value, "chosen": chosen,
                    **{f"{name}_ms": round(float(np.median(t)), 2) for name, t in times.items()}}))


if __name__ == "__main__":
  app.run(main)
