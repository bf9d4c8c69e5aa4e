"""How much accelerator memory the training step needs, from XLA's own buffer assignment.

  python bench/bench_memory.py --d_in=768 --num_latents=32768 --seeds=1,2 --batch_size=16384

Compiles (never runs) the trainer's real jitted step (`train.build`'s, on a `TrainState` of S
TopK seeds) for each S and prints one JSON row per S: the state it takes and hands back
(parameters, Adam moments, counters: `arg_gb`) and XLA's temporaries (`temp_gb`: gradients,
[batch, latents] pre-activations, gathered rows). Their sum is the step's peak; the growth from
one S to the next is one seed's share, which is what decides how many seeds fit. Nothing is
allocated, so a CPU answers for shapes far past its memory; the numbers are the buffer
assignment of the backend it runs on (run it on the accelerator for that backend's own).
"""

from __future__ import annotations

import json

from absl import app
from absl import flags

_D_IN = flags.DEFINE_integer("d_in", 768, "Input width.")
_N = flags.DEFINE_integer("num_latents", 32768, "Latents per SAE.")
_K = flags.DEFINE_integer("k", 32, "Active latents per token.")
_B = flags.DEFINE_integer("batch_size", 16384, "Tokens per batch.")
_SEEDS = flags.DEFINE_list("seeds", ["1", "2"], "Seed counts S to compile.")
_COMPUTE = flags.DEFINE_string("compute_dtype", "bfloat16", "Matrix products' dtype (bfloat16 is "
                               "the trainer's default off CPU).")
_LOOP = flags.DEFINE_enum("seed_loop", "vmap", ["vmap", "map"], "Seeds as one batched program "
                          "(vmap, the default off CPU) or in turn (map).")


def main(_):
  import jax
  import jax.numpy as jnp
  from jaxsae import store, train
  d, n, b = _D_IN.value, _N.value, _B.value
  for s in map(int, _SEEDS.value):
    plan = train.resolve(train.TrainConfig(
        num_latents=n, k=_K.value, batch_size=b, seeds=tuple(range(s)), lr=1e-3,
        lr_warmup_steps=10, penalty_warmup=0, compute_dtype=_COMPUTE.value,
        seed_loop=_LOOP.value), d, 1000 * b)
    tx, _ = train.make_optimizer(plan)
    p = train.build(plan, train.make_mesh(plan), tx)
    rows = store.Rows(jax.ShapeDtypeStruct((b, d), jnp.float32))
    m = p.step.lower(p.abstract_state, rows).compile().memory_analysis()
    arg, temp = m.argument_size_in_bytes / 1e9, m.temp_size_in_bytes / 1e9
    print(json.dumps({"seeds": s, "d_in": d, "num_latents": n, "batch_size": b, "k": _K.value,
                      "compute_dtype": _COMPUTE.value, "seed_loop": _LOOP.value,
                      "backend": jax.default_backend(), "arg_gb": round(arg, 6),
                      "temp_gb": round(temp, 6), "peak_gb": round(arg + temp, 6)}), flush=True)


if __name__ == "__main__":
  app.run(main)
