"""Where one seed's TopK training step spends its time, part by part, on this machine.

  python bench/bench_step_parts.py --batch_size=256 --num_latents=1024

Each part is jitted alone and timed over 10 calls, the parts interleaved round by round
(median of --rounds): the whole step (`train.build`'s, the one training runs), loss and
gradient, the forward alone, the encoder product, the product with XLA's top-k and with the CPU
kernels' top-k, and clip + Adam on the parameters.
"""

from __future__ import annotations

import json

from absl import app
from absl import flags
import numpy as np

import timing

_B = flags.DEFINE_integer("batch_size", 256, "Tokens per batch.")
_N = flags.DEFINE_integer("num_latents", 1024, "Latents.")
_D_IN = flags.DEFINE_integer("d_in", 576, "Input width.")
_K = flags.DEFINE_integer("k", 32, "Active latents per token.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Interleaved rounds.")


def main(_):
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx
  from jaxsae import store, train
  from jaxsae.sae import common

  b, n, d, k = _B.value, _N.value, _D_IN.value, _K.value
  plan = train.resolve(train.TrainConfig(num_latents=n, k=k, batch_size=b, seeds=(0,), lr=1e-3,
                                         lr_warmup_steps=10, penalty_warmup=0), d, 1000 * b)
  tx, _ = train.make_optimizer(plan)
  programs = train.build(plan, train.make_mesh(plan), tx)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(b, d)).astype(np.float32))
  state = programs.init()
  sae_def, saes = nnx.split(nnx.merge(programs.graphdef, state).seeds.sae)
  one = jax.tree.map(lambda a: a[0], saes)  # new arrays, which the step's donation leaves alone
  loss = lambda s, x: nnx.merge(sae_def, s).loss(x, jnp.zeros(n, bool), 1.0)[0]
  w = one["W_enc"][...]
  params = {name: v[...] for name, v in one.items()}
  opt = tx.init(params)

  def adam(p, o, g):
    updates, o = tx.update(g, o, p)
    return optax.apply_updates(p, updates), o

  def step(rows):  # training's own step, which donates the state: each call takes the last's
    nonlocal state
    state, metrics = programs.step(state, rows)
    return metrics

  parts = {
      "step": (step, (store.Rows(x),)),
      "loss_and_grad": (jax.jit(jax.value_and_grad(loss)), (one, x)),
      "forward": (jax.jit(loss), (one, x)),
      "encoder_product": (jax.jit(lambda x, w: x @ w), (x, w)),
      "product_and_top_k": (jax.jit(lambda x, w: jax.lax.top_k(jax.nn.relu(x @ w), k)), (x, w)),
      # The kernels' top-k where they run (else XLA's again).
      "product_and_kernel_top_k": (jax.jit(lambda x, w: common.exact_top_k(
          jax.nn.relu(x @ w), k, plan.execution.cpu_kernels)), (x, w)),
      "clip_and_adam": (jax.jit(adam), (params, opt, jax.tree.map(lambda a: a * 1e-3, params))),
  }
  med = timing.interleaved_ms(parts, _ROUNDS.value, 10)
  print(json.dumps({"batch_size": b, "num_latents": n, "d_in": d, "k": k,
                    **{f"{name}_ms": round(t, 2) for name, t in med.items()}}))


if __name__ == "__main__":
  app.run(main)
