"""vmap vs lax.map over the seed axis for the TopK gradient on this CPU (see BENCHMARKS.md).

  python bench/bench_seed_loop.py
"""
import time, jax, jax.numpy as jnp, sys
from jaxsae.sae import common, topk
B, d, n, k = 4096, 576, 4096, 32
cfg = common.SaeConfig(k=k)
def T(name, f, *a, reps=3):
  f = jax.jit(f); jax.block_until_ready(f(*a)); t = time.perf_counter()
  for _ in range(reps): r = f(*a)
  jax.block_until_ready(r)
  print(f"{name:40s} {(time.perf_counter()-t)/reps*1000:8.1f} ms", flush=True)
x = jax.random.normal(jax.random.key(1), (B, d))
for S in (1, 4):
  p = jax.vmap(lambda s: topk.init(jax.random.key(s), d, n, cfg))(jnp.arange(S))
  g = jax.vmap(jax.grad(lambda p, x: topk.loss(p, x, cfg, jnp.zeros(n, bool), 1.0)[0]), in_axes=(0, None))
  T(f"vmap grad S={S}", g, p, x)
  gm = lambda p, x: jax.lax.map(lambda q: jax.grad(lambda q: topk.loss(q, x, cfg, jnp.zeros(n, bool), 1.0)[0])(q), p)
  T(f"lax.map grad S={S}", gm, p, x)
  f = jax.vmap(lambda p, x: topk.loss(p, x, cfg, jnp.zeros(n, bool), 1.0)[0], in_axes=(0, None))
  T(f"vmap fwd S={S}", f, p, x)
