"""Training throughput and quality: jaxsae's multi-seed step against sparsify and SAELens.

  python bench/bench_train.py --store=out/demo/store --num_latents=4096 --k=32 \
      --batch_size=4096 --seeds=1,4,8 --steps=30 --sides=jaxsae,sparsify,saelens

The peers are bench-only dependencies: `pip install -e .[bench]`.

jaxsae and sparsify train TopK SAEs with the paper's recipe (Adam, lr 2e-4/sqrt(n/2^14), linear
warmup then decay, b_dec at the first batch's mean, unit-norm decoder rows with the parallel
gradient removed) on the identical in-memory batches, so neither pays for data loading. sparsify
is driven the way its trainer drives it: one `SparseCoder` per seed (fused encoder, embedding-bag
decoder, bf16 autocast on CUDA), one after the other. jaxsae runs all seeds in one jitted step
(`vmap` over the seed axis, or the seeds in turn inside it where `train.seed_loop` says).
Reported: tokens/s per seed (after warm-up and compilation), and FVU on a held-out batch after
the same tokens.
Beside jaxsae's step, its floor on the same device (`measure_floor`: the dense encoder product
plus one read-and-write pass over the parameters and Adam's moments, each timed alone) and the
step's ratio to it (`jaxsae_over_floor`).

SAELens (--sides=saelens, S=1 only: its trainer holds one SAE) trains its own `TopKTrainingSAE`
through its own `SAETrainer.step` (the forward pass, its loss, backward, grad-norm clip at 1,
Adam, dead-latent bookkeeping) on the same batches, with the same lr, the same warmup/decay
schedule and b_dec at the first batch's mean; the rest is SAELens's recipe: a summed-MSE loss,
activations rescaled by the decoder row norms instead of a unit-norm decoder, decoder rows
initialised at norm 0.1, a dense [B, n] activation matrix for the decoder product.

Without --store, activations are synthetic: a planted dictionary of 4 * num_latents unit
directions, each token a sparse positive mix of them plus noise (--d_in wide).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import time

from absl import app
from absl import flags
import numpy as np

_STORE = flags.DEFINE_string("store", "", "Activation store; synthetic data when empty.")
_D_IN = flags.DEFINE_integer("d_in", 768, "Width of synthetic activations.")
_N = flags.DEFINE_integer("num_latents", 32768, "Latents per SAE.")
_K = flags.DEFINE_integer("k", 32, "Active latents per token.")
_B = flags.DEFINE_integer("batch_size", 16384, "Tokens per batch.")
_SEEDS = flags.DEFINE_list("seeds", ["1", "4", "8"], "Numbers of seeds S to measure.")
_STEPS = flags.DEFINE_integer("steps", 50, "Timed steps (after --warmup).")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps first (compilation, autotuning).")
_SIDES = flags.DEFINE_list("sides", ["jaxsae", "sparsify"], "Which trainers to run: jaxsae, "
                           "sparsify, saelens (S=1 only).")
_OUT = flags.DEFINE_string("out", "", "Also write the results here as JSON.")
_DENSE = flags.DEFINE_bool("dense_encoder", False, "jaxsae with plain autodiff of the dense "
                           "encoder instead of its fused k-sparse backward (for comparison).")
_BACKWARD = flags.DEFINE_enum("backward", "auto", ["auto", "kernel", "dense", "scatter"], "jaxsae's TopK "
                              "kernel backward (jaxsae train --topk_backward): chosen by shape "
                              "(auto), or forced.")
_PEAK = flags.DEFINE_float("peak_tflops", 989.4, "Device peak dense matrix TFLOP/s at the "
                           "compute dtype (H100 SXM bf16: 989.4), for the roofline fraction.")


def batches(num: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(train batches [num, B, d_in], held-out batch [B, d_in]) as float32."""
  if _STORE.value:
    from jaxsae import store as store_lib
    st = store_lib.Store(_STORE.value)
    xs = np.stack([st.batch(i, _B.value) for i in range(num + 1)])
  else:
    rng = np.random.default_rng(seed)
    d, f = _D_IN.value, 4 * _N.value
    dictionary = rng.normal(size=(f, d)).astype(np.float32)
    dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)
    p = 1.0 / np.arange(1, f + 1) ** 0.7  # a long tail of rare features, as in real models
    p /= p.sum()
    xs = np.empty((num + 1, _B.value, d), np.float32)
    for i in range(num + 1):
      idx = rng.choice(f, size=(_B.value, 16), p=p)  # 16 active features per token
      codes = rng.exponential(size=(_B.value, 16)).astype(np.float32)
      xs[i] = np.einsum("bk,bkd->bd", codes, dictionary[idx])
      xs[i] += 0.05 * rng.normal(size=(_B.value, d)).astype(np.float32)
  return xs[:-1], xs[-1]


def fvu(x: np.ndarray, x_hat: np.ndarray) -> float:
  x, x_hat = x.astype(np.float64), x_hat.astype(np.float64)
  return float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def run_jaxsae(xs, held, num_seeds: int) -> dict:
  import jax
  import jax.numpy as jnp
  from jaxsae import store, train
  from jaxsae.sae import ARCHITECTURES, common

  if _DENSE.value:
    common.topk_encoder = lambda x, w, b, c: jax.lax.top_k(
        jax.nn.relu(common.matmul(x, w, c) + b), c.k)
  steps = len(xs)
  d_in, n = xs.shape[-1], _N.value
  cfg = train.TrainConfig(arch="topk", num_latents=n, k=_K.value, batch_size=_B.value,
                          seeds=tuple(range(num_seeds)), topk_backward=_BACKWARD.value,
                          penalty_warmup=0)
  plan = train.resolve(cfg, d_in, steps * _B.value)
  sae_cfg, dtype = plan.sae, plan.execution.compute_dtype
  tx, _ = train.make_optimizer(plan)
  programs = train.build(plan, train.make_mesh(plan), tx)
  # Float32 rows, on which the store's decode is the identity: the step timed is training's.
  dev = [store.Rows(jax.device_put(x, programs.batch_sharding.codes)) for x in xs]
  state = programs.init_from_first_batch(programs.init(), dev[0])
  step = programs.step
  for i in range(_WARMUP.value):
    state, m = step(state, dev[i])
  jax.block_until_ready(state)
  t = time.perf_counter()
  for i in range(_WARMUP.value, steps):
    state, m = step(state, dev[i])
  jax.block_until_ready(state)
  seconds = time.perf_counter() - t
  weights = jax.device_get(train.exported(programs.graphdef, state))
  fvus = []
  for s in range(num_seeds):
    sae = ARCHITECTURES["topk"].from_weights({k: v[s] for k, v in weights.items()}, sae_cfg)
    x_hat = sae.decode(sae.encode(jnp.asarray(held)))
    fvus.append(fvu(held, np.asarray(x_hat)))
  timed = (steps - _WARMUP.value) * _B.value
  step_s = seconds / (steps - _WARMUP.value)
  # The encoder product every step must do, for every seed: [B, d_in] @ [d_in, n]. With the
  # k-sparse backward there is no other dense product of that size.
  tflops = num_seeds * 2 * _B.value * d_in * n / step_s / 1e12
  floor = measure_floor(num_seeds, d_in, n, dtype)
  return {"tok_s_per_seed": timed / seconds, "fvu": float(np.mean(fvus)),
          "device": str(jax.devices()[0].device_kind), "compute_dtype": dtype,
          "backward": plan.execution.topk_path, "seed_loop": plan.execution.seed_loop,
          "step_s": step_s, "encoder_tflops": tflops, "roofline": tflops / _PEAK.value,
          **floor, "over_floor": step_s / floor["floor_s"]}


def measure_floor(num_seeds: int, d_in: int, n: int, compute_dtype: str, calls: int = 5) -> dict:
  """The step's own floor on this device, measured rather than taken from a datasheet: the one
  dense product every step must do, [B, d_in] @ [d_in, n] for every seed in the compute dtype,
  plus one pass that reads the gradient and reads and writes the parameters and Adam's two
  moments (the optimizer at memory speed). Everything else the step does (top-k, the k-sparse
  decode and gradients, the loss) is what the step spends above it."""
  import jax
  import jax.numpy as jnp

  dt = jnp.dtype(compute_dtype)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(_B.value, d_in)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(num_seeds, d_in, n)) / d_in**0.5, jnp.float32)
  # One 2-D product per seed: on XLA's CPU the same work as one batched einsum ran 1.2-1.4x
  # slower ([4096, 576] @ [576, 4096], 1 and 4 seeds), and a floor is the fastest form.
  product = jax.jit(lambda x, w: tuple(
      jnp.matmul(x.astype(dt), w[s].astype(dt), preferred_element_type=jnp.float32)
      for s in range(num_seeds)))
  size = num_seeds * (2 * d_in * n + n + d_in)  # W_enc, W_dec, b_enc, b_dec

  @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
  def adam_pass(p, m, v, g):
    m = 0.9 * m + 0.1 * g
    v = 0.999 * v + 0.001 * g * g
    return p - 1e-3 * m / (jnp.sqrt(v) + 1e-8), m, v

  state = [jnp.full(size, 0.5, jnp.float32) for _ in range(3)]
  grad = jnp.full(size, 1e-3, jnp.float32)

  def median_s(fn):
    times = []
    for _ in range(calls + 2):
      t = time.perf_counter()
      jax.block_until_ready(fn())
      times.append(time.perf_counter() - t)
    return float(np.median(times[2:]))

  def one_pass():
    state[:] = adam_pass(*state, grad)
    return state

  product_s = median_s(lambda: product(x, w))
  state_s = median_s(one_pass)
  return {"floor_s": product_s + state_s, "floor_product_s": product_s, "floor_state_s": state_s}


def run_sparsify(xs, held, num_seeds: int) -> dict:
  import torch
  from sparsify import SparseCoder, SparseCoderConfig
  from transformers import get_linear_schedule_with_warmup

  device = "cuda" if torch.cuda.is_available() else "cpu"
  steps, d_in, n = len(xs), xs.shape[-1], _N.value
  lr = 2e-4 / (n / 2**14) ** 0.5
  coders, opts, scheds = [], [], []
  for seed in range(num_seeds):
    torch.manual_seed(seed)
    c = SparseCoder(d_in, SparseCoderConfig(num_latents=n, k=_K.value), device, torch.float32)
    opt = torch.optim.Adam(c.parameters(), lr=lr)
    coders.append(c)
    opts.append(opt)
    scheds.append(get_linear_schedule_with_warmup(opt, 1000, steps))
  dev = [torch.from_numpy(x).to(device) for x in xs]

  def train_step(i):
    for c, opt, sched in zip(coders, opts, scheds):  # sparsify's trainer: one coder at a time
      x = dev[i]
      if i == 0:
        c.b_dec.data = x.mean(0)
      c.set_decoder_norm_to_unit_norm()
      c(x).fvu.backward()
      c.remove_gradient_parallel_to_decoder_directions()
      opt.step()
      opt.zero_grad()
      sched.step()

  seconds = _timed_torch_steps(train_step, steps, device)
  fvus = []
  with torch.no_grad():
    for c in coders:
      c.set_decoder_norm_to_unit_norm()
      h = torch.from_numpy(held).to(device)
      out = c.decode(*c.encode(h)[:2])
      fvus.append(fvu(held, out.float().cpu().numpy()))
  timed = (steps - _WARMUP.value) * _B.value
  return {"tok_s_per_seed": timed / seconds, "fvu": float(np.mean(fvus)),
          "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
          "step_s": seconds / (steps - _WARMUP.value)}


def _timed_torch_steps(train_step, steps: int, device: str) -> float:
  """Seconds for steps --warmup.. of a PyTorch side, synchronised where work is asynchronous."""
  import torch
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  for i in range(_WARMUP.value):
    train_step(i)
  sync()
  t = time.perf_counter()
  for i in range(_WARMUP.value, steps):
    train_step(i)
  sync()
  return time.perf_counter() - t


def run_saelens(xs, held, num_seeds: int) -> dict:
  import torch
  from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
  from sae_lens.config import SAETrainerConfig
  from sae_lens.training.sae_trainer import SAETrainer
  from transformers import get_linear_schedule_with_warmup

  assert num_seeds == 1, "SAELens's trainer holds one SAE"
  device = "cuda" if torch.cuda.is_available() else "cpu"
  steps, d_in, n = len(xs), xs.shape[-1], _N.value
  lr = 2e-4 / (n / 2**14) ** 0.5
  torch.manual_seed(0)
  # SAELens's own TopK recipe beyond the sizes (see the module docstring). Its sparse latents
  # (use_sparse_activations=True) fail in backward with its default rescale by the decoder
  # norms on torch 2.13's CPU (no aten::view for SparseCPU), so they stay dense.
  sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=n, k=_K.value, dtype="float32",
                                              device=device))
  # bf16 autocast on CUDA as the other sides compute there; SAELens's own default is off.
  cfg = SAETrainerConfig(total_training_samples=steps * _B.value,
                         train_batch_size_samples=_B.value, lr=lr, lr_end=lr, device=device,
                         autocast=device == "cuda")
  trainer = SAETrainer(cfg, sae, data_provider=iter(()))
  # SAELens's scheduler cannot express a warmup longer than the run (its constant phase would
  # have negative length), so its optimizer gets the schedule the other sides use.
  trainer.lr_scheduler = get_linear_schedule_with_warmup(trainer.optimizer, 1000, steps)
  sae.to(device)
  dev = [torch.from_numpy(x).to(device) for x in xs]

  def train_step(i):
    if i == 0:
      with torch.no_grad():
        sae.b_dec.data = dev[0].mean(0)  # SAELens starts b_dec at 0; the others at this mean
    trainer.maybe_reset_sparsity()  # SAETrainer.fit's loop, without wandb and checkpoints
    trainer.step(dev[i])
    trainer.n_training_steps += 1

  seconds = _timed_torch_steps(train_step, steps, device)
  with torch.no_grad():
    out = sae.decode(sae.encode(torch.from_numpy(held).to(device)))
  timed = (steps - _WARMUP.value) * _B.value
  return {"tok_s_per_seed": timed / seconds, "fvu": fvu(held, out.float().cpu().numpy()),
          "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
          "step_s": seconds / (steps - _WARMUP.value)}


RUNNERS = {"jaxsae": run_jaxsae, "sparsify": run_sparsify, "saelens": run_saelens}
# The module each peer side imports; they come from the bench extra, never jaxsae's own deps.
PEERS = {"sparsify": "sparsify", "saelens": "sae_lens"}


def check_sides(sides) -> None:
  """Fail in one line before any side runs, not after jaxsae has spent minutes."""
  for side in sides:
    if side not in RUNNERS:
      raise SystemExit(f"bench_train: --sides={side} is unknown; use {', '.join(RUNNERS)}")
    if side in PEERS and importlib.util.find_spec(PEERS[side]) is None:
      raise SystemExit(f"bench_train: --sides={side} needs the {PEERS[side]} package, a "
                       "bench-only peer: pip install -e .[bench]")


def main(_):
  check_sides(_SIDES.value)
  steps = _WARMUP.value + _STEPS.value
  xs, held = batches(steps)
  results = []
  for s in map(int, _SEEDS.value):
    row = {"seeds": s, "d_in": xs.shape[-1], "num_latents": _N.value, "k": _K.value,
           "batch_size": _B.value, "tokens_per_seed": steps * _B.value}
    for side in _SIDES.value:
      if side == "saelens" and s > 1:
        row["saelens"] = f"skipped at S={s}: SAELens's trainer holds one SAE; S=1 only"
        continue
      r = RUNNERS[side](xs, held, s)
      row.update({f"{side}_{k}": v for k, v in r.items()})
    if "jaxsae_tok_s_per_seed" in row:
      # "speedup" (against sparsify) keeps the name the recorded results use.
      for peer, key in (("sparsify", "speedup"), ("saelens", "speedup_vs_saelens")):
        if f"{peer}_tok_s_per_seed" in row:
          row[key] = row["jaxsae_tok_s_per_seed"] / row[f"{peer}_tok_s_per_seed"]
    print(json.dumps(row), flush=True)
    results.append(row)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  app.run(main)
