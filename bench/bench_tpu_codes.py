"""The MXU TopK path's dense codes, shaped and held four ways, each compiled into the trainer's
step for a TPU slice on this machine (no TPU): XLA's per-device flops, bytes and temporaries,
and the roofline against the encoder product. How BENCHMARKS.md ("The codes' shape") chose
jaxsae's: [B, n/128, 128] behind an optimization barrier. Estimates of XLA's cost model on
published peaks, not timings.

  python bench/bench_tpu_codes.py                          # v5e:2x2, every variant
  python bench/bench_tpu_codes.py --topology=v6e:2x2 base shaped
"""

import sys
import time

import jax
import jax.numpy as jnp
from absl import flags

from jaxsae import tpu
from jaxsae.sae import common
from jaxsae.sae.common import densify, matmul, select_top_k
from jaxsae.train import TrainConfig, compile_report, make_mesh, make_optimizer, resolve
from jaxsae.train.programs import build

flags.DEFINE_string("topology", "v5e:2x2", "The slice compiled for, one seed per device.")
B, N, D = 16384, 32768, 768


def fwd_flat(x, w_enc, b, w_dec, cfg, barrier=False):
  """[B, n] codes: the path as first built (45bcbec); `barrier`: every use of z behind one."""
  vals, idx = select_top_k(jax.nn.relu(matmul(x, w_enc, cfg) + b), cfg)
  z = densify(vals.astype(cfg.compute_dtype), idx, w_enc.shape[-1])
  z = jax.lax.optimization_barrier(z) if barrier else z
  return (matmul(z, w_dec, cfg), vals, idx), (x, z, w_dec)


def bwd_flat(cfg, res, cts):
  x, z, w_dec = res
  ct = cts[0]
  dpre = jnp.where(z > 0, matmul(ct, w_dec.T, cfg), 0.0).astype(z.dtype)
  return (jnp.zeros_like(x), matmul(x.T, dpre, cfg), jnp.sum(dpre, axis=0, dtype=jnp.float32),
          matmul(z.T, ct, cfg))


def bwd_sign(cfg, res, cts):
  """The fired mask as sign(z) times the gradient, not a select."""
  x, z, w_dec = res
  ct = cts[0]
  dpre = (matmul(ct, w_dec.T, cfg) * jnp.sign(z).astype(jnp.float32)).astype(z.dtype)
  return (jnp.zeros_like(x), matmul(x.T, dpre, cfg), jnp.sum(dpre, axis=0, dtype=jnp.float32),
          matmul(z.T, ct, cfg))


def fwd_shaped_no_barrier(x, w_enc, b, w_dec, cfg):
  """jaxsae's [B, n/128, 128] codes (common._mxu_topk_fwd) without its barrier."""
  n, d = w_dec.shape
  vals, idx = select_top_k(jax.nn.relu(matmul(x, w_enc, cfg) + b), cfg)
  z = densify(vals.astype(cfg.compute_dtype), idx, n, lanes=common.LANES)
  out = jnp.einsum("bij,ijd->bd", z, w_dec.reshape(z.shape[1:] + (d,)).astype(z.dtype),
                   preferred_element_type=jnp.float32)
  return (out, vals, idx), (x, z, w_dec)


VARIANTS = {
    "base": (fwd_flat, bwd_flat),
    "sign": (fwd_flat, bwd_sign),
    "barrier": (lambda *a: fwd_flat(*a, barrier=True), bwd_flat),
    "shaped, no barrier": (fwd_shaped_no_barrier, common._mxu_topk_bwd),
    "shaped": (common._mxu_topk_fwd, common._mxu_topk_bwd),  # jaxsae's
}


def compile_variant(name, topology):
  fwd, bwd = VARIANTS[name]
  f = jax.custom_vjp(lambda x, w, b, wd, cfg: fwd(x, w, b, wd, cfg)[0], nondiff_argnums=(4,))
  f.defvjp(fwd, bwd)
  common.mxu_topk = f  # what TopK's loss calls on the MXU path
  topo = tpu.topology(topology)
  cfg = TrainConfig(store="s", out="o", arch="topk", k=32, batch_size=B, num_tokens=B * 1000,
                    num_seeds=len(topo.devices), num_latents=N)
  plan = resolve(cfg, D, 10**9, topo.devices)
  mesh = make_mesh(plan, topo.devices)
  p = build(plan, mesh, make_optimizer(plan)[0])
  rows = compile_report._abstract_rows(p, plan, False)
  t = time.perf_counter()
  cost = compile_report.program_cost(p.step.lower(p.abstract_state, rows).compile())
  chip = topo.per_device
  step, bound = compile_report.roofline(cost.flops, cost.bytes_accessed, chip)
  product = 2 * B * D * N / chip.bf16_flops
  print(f"{name:20s} flops {cost.flops / 1e12:.3f} T  bytes {cost.bytes_accessed / 1e9:6.2f} GB  "
        f"temporaries {cost.temporaries / 1e9:.2f} GB  step {step * 1e3:5.1f} ms ({bound}), "
        f"{step / product:.2f}x the product  [compiled in {time.perf_counter() - t:.0f} s]",
        flush=True)


if __name__ == "__main__":
  names = flags.FLAGS(sys.argv)[1:] or list(VARIANTS)
  for name in names:
    compile_variant(name, flags.FLAGS.topology)
