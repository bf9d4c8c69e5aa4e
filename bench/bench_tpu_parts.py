"""The TopK step's pieces, and whole-gradient variants of it, compiled for one v5e chip on this
machine (no TPU): XLA's TPU cost model per piece, which is how BENCHMARKS.md's TPU section chose
the MXU path. One seed, B 16,384, n 32,768, d_in 768, bfloat16 products. Estimates of XLA's
model on the chip's published peaks, not timings.

  python bench/bench_tpu_parts.py                 # every piece, then every variant
  python bench/bench_tpu_parts.py "gather decode" "mxu approx"
"""

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxsae import tpu
from jaxsae.sae import common
from jaxsae.train import compile_report as cr

topo = tpu.topology("v5e:2x2")
S = NamedSharding(Mesh(np.array([topo.devices[0]]), ("x",)), P())
B, N, D, K = 16384, 32768, 768, 32
bf = jnp.bfloat16


def mm(a, b):
  return jnp.matmul(a.astype(bf), b.astype(bf), preferred_element_type=jnp.float32)


def sd(*s, dt=jnp.float32):
  return jax.ShapeDtypeStruct(s, dt, sharding=S)

def gdt(v, i, wd):
  t = wd.astype(bf).reshape(N, D // 128, 128)[i]  # [B,k,6,128]
  return jnp.einsum("bk,bkjl->bjl", v.astype(bf), t, preferred_element_type=jnp.float32).reshape(B, D)
def sct(g, i, e):
  u = (g[:, :, None] * e[:, None, :]).reshape(-1, D // 128, 128)
  return jnp.zeros((N, D // 128, 128), jnp.float32).at[i.reshape(-1)].add(u).reshape(N, D)
def gdot(e, i, wd):
  t = wd.astype(bf).reshape(N, D // 128, 128)[i]
  return jnp.einsum("bjl,bkjl->bk", e.astype(bf).reshape(B, D // 128, 128), t, preferred_element_type=jnp.float32)
PARTS = {
 "gather decode tiled": (gdt, (sd(B, K), sd(B, K, dt=jnp.int32), sd(N, D))),
 "gather dot tiled": (gdot, (sd(B, D), sd(B, K, dt=jnp.int32), sd(N, D))),
 "scatter rows tiled": (sct, (sd(B, K), sd(B, K, dt=jnp.int32), sd(B, D))),
 "product f32 out": (lambda x, w: mm(x, w), (sd(B, D), sd(D, N))),
 "approx fwd": (lambda x, w, b: jax.lax.approx_max_k(jax.nn.relu(mm(x, w) + b), K, recall_target=0.95), (sd(B, D), sd(D, N), sd(N))),
 "approx fwd bf16": (lambda x, w, b: jax.lax.approx_max_k(jax.nn.relu(mm(x, w) + b).astype(bf), K, recall_target=0.95), (sd(B, D), sd(D, N), sd(N))),
 "approx fwd no relu": (lambda x, w: jax.lax.approx_max_k(mm(x, w), K, recall_target=0.95), (sd(B, D), sd(D, N))),
 "gather decode": (lambda v, i, wd: jnp.einsum("bk,bkd->bd", v.astype(bf), wd.astype(bf)[i], preferred_element_type=jnp.float32), (sd(B, K), sd(B, K, dt=jnp.int32), sd(N, D))),
 "gather decode bf16 table": (lambda v, i, wd: jnp.einsum("bk,bkd->bd", v.astype(bf), wd[i], preferred_element_type=jnp.float32), (sd(B, K), sd(B, K, dt=jnp.int32), sd(N, D, dt=bf))),
 "scatter rows": (lambda g, i, e: jnp.zeros((N, D), jnp.float32).at[i.reshape(-1)].add((g[:, :, None] * e[:, None, :]).reshape(-1, D)), (sd(B, K), sd(B, K, dt=jnp.int32), sd(B, D))),
 "densify+product": (lambda g, i, e: mm(jnp.zeros((B, N), bf).at[jnp.arange(B)[:, None], i].set(g.astype(bf), unique_indices=True).T, e), (sd(B, K), sd(B, K, dt=jnp.int32), sd(B, D))),
 "adam-like": (lambda p, g, m, v: (p - 0.1 * (0.9*m+0.1*g) / (jnp.sqrt(0.99*v + 0.01*g*g) + 1e-8), 0.9*m+0.1*g, 0.99*v+0.01*g*g), (sd(N, D), sd(N, D), sd(N, D), sd(N, D))),
}
def sel_exact(pre): return common.grouped_top_k(pre, K, False)
def sel_approx(pre): return jax.lax.approx_max_k(pre, K, recall_target=0.95)

def encoder(weight_grads):
  """TopK's encoder whose W_enc and b_enc gradients are `weight_grads(x, g, idx)`."""
  def apply(x, w, b, select):
    @jax.custom_vjp
    def f(x, w, b):
      return select(jax.nn.relu(mm(x, w) + b))

    def fwd(x, w, b):
      v, i = f(x, w, b)
      return (v, i), (x, v, i)

    def bwd(res, ct):
      x, v, i = res
      return (None, *weight_grads(x, jnp.where(v > 0, ct[0], 0.0), i))

    f.defvjp(fwd, bwd)
    return f(x, w, b)
  return apply


def enc_dense(x, g, i):
  dense = common.densify(g.astype(bf), i, N)
  return mm(x.T, dense), dense.astype(jnp.float32).sum(0)


def enc_scatter(x, g, i):
  flat = i.reshape(-1)
  upd = (g[:, :, None] * x[:, None, :].astype(jnp.float32)).reshape(-1, D)
  return (jnp.zeros((N, D), jnp.float32).at[flat].add(upd).T,
          jnp.zeros((N,), jnp.float32).at[flat].add(g.reshape(-1)))


def dec_gather(v, i, wd):
  rows = wd.astype(bf)[i]
  return jnp.einsum("bk,bkd->bd", v.astype(bf), rows, preferred_element_type=jnp.float32)


def decoder(weight_grad):
  """A gathered decode whose W_dec gradient is `weight_grad(v, idx, ct)`."""
  def apply(v, i, wd):
    @jax.custom_vjp
    def f(v, wd):
      return dec_gather(v, i, wd)

    def bwd(res, ct):
      v, wd = res
      rows = wd.astype(bf)[i]
      dv = jnp.einsum("bd,bkd->bk", ct.astype(bf), rows, preferred_element_type=jnp.float32)
      return dv, weight_grad(v, i, ct)

    f.defvjp(lambda v, wd: (f(v, wd), (v, wd)), bwd)
    return f(v, wd)
  return apply


enc_dense_bwd, enc_scatter_bwd = encoder(enc_dense), encoder(enc_scatter)
dec_dense_bwd = decoder(lambda v, i, ct: mm(common.densify(v.astype(bf), i, N).T, ct))
dec_scatter_bwd = decoder(lambda v, i, ct: jnp.zeros((N, D), jnp.float32).at[i.reshape(-1)].add(
    (v[:, :, None] * ct[:, None, :]).reshape(-1, D)))


def mxu_block(x, w, b, wd, select):
  @jax.custom_vjp
  def f(x, w, b, wd):
    pre = jax.nn.relu(mm(x, w) + b)
    v, i = select(pre)
    z = common.densify(v.astype(bf), i, N)
    return mm(z, wd)
  def fwd(x, w, b, wd):
    pre = jax.nn.relu(mm(x, w) + b)
    v, i = select(pre)
    z = common.densify(v.astype(bf), i, N)
    return mm(z, wd), (x, z, wd)
  def bwd(res, ct):
    x, z, wd = res
    dpre = jnp.where(z > 0, mm(ct, wd.T), 0.0).astype(bf)
    return None, mm(x.T, dpre), dpre.astype(jnp.float32).sum(0), mm(z.T, ct)
  f.defvjp(fwd, bwd)
  return f(x, w, b, wd)
MXU = {"mxu approx": sel_approx, "mxu exact": sel_exact}
VARIANTS = {"mxu approx": 1, "mxu exact": 1, "mxu approx, jaxsae's mxu_topk": 1,
  "exact+scatter(jaxsae)": None,
  "approx+scatter/scatter": (sel_approx, enc_scatter_bwd, dec_scatter_bwd),
  "approx+dense/dense": (sel_approx, enc_dense_bwd, dec_dense_bwd),
  "approx+dense enc/scatter dec": (sel_approx, enc_dense_bwd, dec_scatter_bwd),
  "exact+dense/dense": (sel_exact, enc_dense_bwd, dec_dense_bwd),
}
def make(name):
  cfg = common.SaeConfig(k=K, compute_dtype="bfloat16", topk_path="scatter")
  def loss(params, x):
    w, b, wd, bd = params
    bb = b - mm(bd[None], w)[0]
    if name in MXU:
      xh = mxu_block(x, w, bb, wd, MXU[name]) + bd
    elif name.endswith("mxu_topk"):  # the trainer's own: codes [B, n / 128, 128], a barrier
      mxu_cfg = common.SaeConfig(k=K, compute_dtype="bfloat16", topk_path="mxu",
                                 topk_rule="approx")
      xh = common.mxu_topk(x, w, bb, wd, mxu_cfg)[0] + bd
    elif VARIANTS[name] is None:
      v, i = common.topk_encoder(x, w, bb, cfg)
      xh = common.sparse_decode(v, i, wd, cfg, "scatter") + bd
    else:
      sel, enc, dec = VARIANTS[name]
      v, i = enc(x, w, bb, sel)
      xh = dec(v, i, wd) + bd
    e = x - xh
    return jnp.sum(e * e) / common.total_variance(x)
  return jax.jit(jax.grad(loss), in_shardings=(S, S), out_shardings=S)

PARAMS = (sd(D, N), sd(N), sd(N, D), sd(D))


def report(name, compiled):
  pc = cr.program_cost(compiled)
  s, bound = cr.roofline(pc.flops, pc.bytes_accessed, topo.per_device)
  floor = 2 * B * D * N / topo.per_device.bf16_flops
  print(f"{name:30s} flops {pc.flops / 1e12:.3f} T  bytes {pc.bytes_accessed / 1e9:6.2f} GB  "
        f"roofline {s * 1e3:6.2f} ms ({s / floor:4.1f}x the product, {bound}-bound)  "
        f"XLA's estimate {pc.xla_seconds * 1e3 if pc.xla_seconds else float('nan'):.2f} ms",
        flush=True)


for name in (sys.argv[1:] or [*PARTS, *VARIANTS]):
  t = time.perf_counter()
  if name in PARTS:
    fn, args = PARTS[name]
    report(name, jax.jit(fn).lower(*args).compile())
  else:
    report(name, make(name).lower(PARAMS, sd(B, D)).compile())
