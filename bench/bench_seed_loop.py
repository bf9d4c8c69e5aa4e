"""vmap vs lax.map over the seed axis for the TopK gradient on this CPU (see BENCHMARKS.md).

  python bench/bench_seed_loop.py
"""
import time

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsae.sae import SaeConfig, TopK

B, d, n, k = 4096, 576, 4096, 32
cfg = SaeConfig(k=k)


def timed(name, f, *a, reps=3):
  f = jax.jit(f)
  jax.block_until_ready(f(*a))
  t = time.perf_counter()
  for _ in range(reps):
    r = f(*a)
  jax.block_until_ready(r)
  print(f"{name:40s} {(time.perf_counter() - t) / reps * 1000:8.1f} ms", flush=True)


x = jax.random.normal(jax.random.key(1), (B, d))
for S in (1, 4):
  graphdef, states = nnx.split(nnx.vmap(lambda r: TopK(d, n, cfg, rngs=r))(
      nnx.Rngs(jax.vmap(jax.random.key)(jnp.arange(S)))))
  loss = lambda s, x: nnx.merge(graphdef, s).loss(x, jnp.zeros(n, bool), 1.0)[0]
  timed(f"vmap grad S={S}", jax.vmap(jax.grad(loss), in_axes=(0, None)), states, x)
  timed(f"lax.map grad S={S}", lambda s, x: jax.lax.map(lambda q: jax.grad(loss)(q, x), s),
        states, x)
  timed(f"vmap fwd S={S}", jax.vmap(loss, in_axes=(0, None)), states, x)
