"""jaxsae's CPU kernels against the XLA code they replace, one kernel at a time.

  python bench/bench_cpu_kernels.py --shapes=256x1024,4096x4096

For each batch x latents shape: top-k of a ReLU'd [B, n] (the kernel against jax.lax.top_k),
the k-row decode (gather_sum), its activations' gradient (gather_dot) and the weights'
gradient (scatter_rows) against their jax references in cpu_kernels.py, each jitted alone, on
the same inputs, interleaved round by round; median ms of --calls calls per round. The whole
step's paths are bench_kernels.py's.
"""

from __future__ import annotations

import json

from absl import app
from absl import flags
import numpy as np

import timing

_SHAPES = flags.DEFINE_list("shapes", ["256x1024", "4096x4096"], "BATCHxLATENTS shapes.")
_D_IN = flags.DEFINE_integer("d_in", 576, "Row width.")
_K = flags.DEFINE_integer("k", 32, "Selected latents per token.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Interleaved rounds.")
_CALLS = flags.DEFINE_integer("calls", 5, "Calls per round.")


def main(_):
  import jax
  import jax.numpy as jnp
  from jaxsae import cpu_kernels as ck

  if not ck.available():
    raise SystemExit("bench_cpu_kernels: the kernels do not run here (one CPU device and a C++ "
                     "compiler are needed; see the warning above)")
  k, d = _K.value, _D_IN.value
  for shape in _SHAPES.value:
    b, n = map(int, shape.lower().split("x"))
    rng = np.random.default_rng(0)
    pre = jnp.asarray(np.maximum(rng.normal(size=(b, n)), 0).astype(np.float32))
    vals, idx = ck.top_k(pre, k)
    x = jnp.asarray(rng.normal(size=(b, d)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(n, d)).astype(np.float32))
    pairs = {
        "top_k": ((lambda p: ck.top_k(p, k)), (lambda p: jax.lax.top_k(p, k)), (pre,)),
        "gather_sum": (ck.gather_sum, ck.gather_sum_reference, (vals, idx, w)),
        "gather_dot": (ck.gather_dot, ck.gather_dot_reference, (x, idx, w)),
        "scatter_rows": ((lambda c, i, r: ck.scatter_rows(c, i, r, n)),
                         (lambda c, i, r: ck.scatter_rows_reference(c, i, r, n)), (vals, idx, x)),
    }
    fns = {}
    for name, (kernel, reference, args) in pairs.items():
      fns[f"{name}_kernel"] = (jax.jit(kernel), args)
      fns[f"{name}_xla"] = (jax.jit(reference), args)
    med = timing.interleaved_ms(fns, _ROUNDS.value, _CALLS.value)
    row = {"batch": b, "num_latents": n, "d_in": d, "k": k}
    for name in pairs:
      row.update({f"{name}_kernel_ms": round(med[f"{name}_kernel"], 2),
                  f"{name}_xla_ms": round(med[f"{name}_xla"], 2),
                  f"{name}_speedup": round(med[f"{name}_xla"] / med[f"{name}_kernel"], 2)})
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  app.run(main)
