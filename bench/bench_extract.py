"""Extraction throughput: jaxsae's truncated forward against a plain full forward.

  python bench/bench_extract.py --num_tokens=32768 --ctx_len=256 --batch_size=8

Both run the same model over the same windows of the default corpus in the same process. The
full forward is timed twice: the whole causal LM (with the vocabulary projection, what a
`model(ids)` call costs) and its decoder stack alone (`model.base_model`). jaxsae's side is the real
`extract_shards` path: hooks, packing, bf16 conversion and shard writing included.

  python bench/bench_extract.py --variants=fp32,threads1,no_grad,bf16,autocast,bs4,bs16

compares ways of running jaxsae's truncated forward instead: each variant runs the same
`--num_tokens` of windows, the variants interleaved round by round (A, B, A, B, ...) so that
load from other processes on a shared CPU falls on all of them alike. The first variant is the
reference: ratios are its time over the variant's, per round, then the median. Each variant's
activations (special tokens left out, as in the store) are rounded to the stored dtype and
compared with the first variant's float32 activations: relative error ||stored - ref|| / ||ref||
per row, max and median.
"""

from __future__ import annotations

import contextlib
import copy
import json
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
import torch

from jaxsae import corpus
from jaxsae import extract
from jaxsae import store
from jaxsae import store_writer

_MODEL = flags.DEFINE_string("model", extract.DEFAULT_MODEL, "Model to benchmark.")
_SITE = flags.DEFINE_string("site", "middle", "Site to extract.")
_TOKENS = flags.DEFINE_integer("num_tokens", 32768, "Token positions per measurement.")
_CTX = flags.DEFINE_integer("ctx_len", 256, "Window length.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Windows per forward.")
_DEVICE = flags.DEFINE_string("device", "auto", "torch device.")
_VARIANTS = flags.DEFINE_list(
    "variants", [], "Forward variants to compare instead of the default benchmark, the first "
    "being the reference; each is '+'-joined parts: fp32 (as `jaxsae extract` runs), bf16 "
    "(--model_dtype=bfloat16), autocast (float32 weights under bfloat16 autocast), no_grad "
    "(torch.no_grad instead of inference_mode), threadsN (torch.set_num_threads(N)), compile "
    "(torch.compile), bsN (N windows per forward instead of --batch_size).")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Interleaved rounds per variant.")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Stored dtype the variants' errors are "
                             "measured in.")


def _time(fn, batches) -> float:
  t = time.perf_counter()
  for x in batches:
    fn(x)
  if torch.cuda.is_available():
    torch.cuda.synchronize()
  return time.perf_counter() - t


def layer_index(site_path: str, layers_path: str) -> int:
  """The decoder layer a site sits in (model.layers.15.mlp -> 15), for any family's layout."""
  return int(site_path[len(layers_path) + 1:].split(".")[0])


def _variant(spec: str) -> dict:
  v = {"name": spec, "model_dtype": "float32", "autocast": False, "no_grad": False,
       "threads": torch.get_num_threads(), "compile": False, "batch_size": _BATCH.value}
  for part in spec.split("+"):
    if part in ("fp32", "bf16"):
      v["model_dtype"] = {"fp32": "float32", "bf16": "bfloat16"}[part]
    elif part in ("autocast", "no_grad", "compile"):
      v[part] = True
    elif part.startswith("threads"):
      v["threads"] = int(part[len("threads"):])
    elif part.startswith("bs"):
      v["batch_size"] = int(part[len("bs"):])
    else:
      raise app.UsageError(f"--variants: unknown part {part!r} in {spec!r}")
  return v


def compare(model, tok, device):
  """Interleaved throughput and stored-row error of the `--variants` of the truncated forward."""
  variants = [_variant(s) for s in _VARIANTS.value]
  n_windows = _TOKENS.value // _CTX.value
  wins = np.stack([w for _, w in zip(range(n_windows + 1),
                                     extract.windows(corpus.documents("default"), tok,
                                                     _CTX.value))])
  warm, wins = wins[:1], wins[1:]  # the warm-up window is not among the timed ones
  keep = ~np.isin(wins, extract._special_ids(tok)).reshape(-1)
  sites = extract.resolve_sites(model, [_SITE.value])
  # One copy of the model per (dtype, compile), hooked after every copy is made (a deepcopy
  # would copy the hooks too). torch.compile of the whole model loses the hooks' early exit, so
  # `compile` compiles each decoder layer below the sites' and runs the hooked one eagerly.
  layers_path, _ = extract.decoder_layers(model)
  below = min(layer_index(p, layers_path) for p, _ in sites)
  weights = {}
  for v in variants:
    key = (v["model_dtype"], v["compile"])
    if key not in weights:
      m = model if key == ("float32", False) else \
          copy.deepcopy(model).to(getattr(torch, v["model_dtype"]))
      if v["compile"]:
        for layer in m.get_submodule(layers_path)[:below]:
          layer.compile()
      weights[key] = m
    v["key"] = key
  hooked = {k: extract.Hooked(m, sites) for k, m in weights.items()}

  def forward(v, ids):
    """Activations [windows * ctx_len, d_in] float32 of `ids`, in batches of the variant's."""
    torch.set_num_threads(v["threads"])
    grad = torch.no_grad() if v["no_grad"] else torch.inference_mode()
    amp = torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if v["autocast"] \
        else contextlib.nullcontext()
    out = []
    h = hooked[v["key"]]
    with grad, amp:
      for b in range(0, len(ids), v["batch_size"]):
        x = torch.from_numpy(ids[b:b + v["batch_size"]].astype(np.int64)).to(device)
        out.append(h.__call__.__wrapped__(h, x).float().cpu().numpy())
    return np.concatenate(out).reshape(-1, out[0].shape[-1])

  default_threads = torch.get_num_threads()
  for v in variants:  # warm-up; for compile, this is the compilation
    t = time.perf_counter()
    forward(v, np.repeat(warm, v["batch_size"], axis=0))
    v["warmup_s"] = time.perf_counter() - t
    v["seconds"] = []
  for r in range(_ROUNDS.value):
    for v in variants:
      t = time.perf_counter()
      acts = forward(v, wins)
      v["seconds"].append(time.perf_counter() - t)
      if r == 0:
        v["acts"] = acts[keep]
      print(f"round {r} {v['name']}: {wins.size / v['seconds'][-1]:,.0f} tokens/s", flush=True)
  torch.set_num_threads(default_threads)

  ref = variants[0]["acts"]
  ref_norm = np.linalg.norm(ref, axis=-1)
  rows = []
  for v in variants:
    stored = store.dequantize(*store.quantize(v["acts"], _DTYPE.value))
    err = np.linalg.norm(stored - ref, axis=-1) / ref_norm
    ratio = np.median(np.asarray(variants[0]["seconds"]) / np.asarray(v["seconds"]))
    rows.append({"variant": v["name"], "tok_s": wins.size / np.median(v["seconds"]),
                 "ratio": float(ratio), "max_rel_err": float(err.max()),
                 "median_rel_err": float(np.median(err)), "warmup_s": v["warmup_s"],
                 "rounds_tok_s": [round(wins.size / s) for s in v["seconds"]]})
  print(json.dumps({"model": extract.model_source(_MODEL.value)["id"], "device": device,
                    "site": sites[0][0], "tokens_per_round": int(wins.size),
                    "rows_compared": int(keep.sum()), "stored_dtype": _DTYPE.value,
                    "rounds": _ROUNDS.value, "variants": rows}, indent=1))
  print("\n| variant | tokens/s | ratio | max / median relative error vs float32 |")
  print("| --- | ---: | ---: | ---: |")
  for r in rows:
    print(f"| {r['variant']} | {r['tok_s']:,.0f} | {r['ratio']:.2f}x | "
          f"{r['max_rel_err']:.4f} / {r['median_rel_err']:.4f} |")


def main(_):
  device = ("cuda" if torch.cuda.is_available() else "cpu") if _DEVICE.value == "auto" \
      else _DEVICE.value
  source = extract.model_source(_MODEL.value)
  model, tok = extract.load_model(source, device)
  if _VARIANTS.value:
    return compare(model, tok, device)
  n_windows = _TOKENS.value // _CTX.value
  wins = np.stack([w for _, w in zip(range(n_windows),
                                     extract.windows(corpus.documents("default"), tok,
                                                     _CTX.value))])
  batches = [torch.from_numpy(wins[i:i + _BATCH.value].astype(np.int64)).to(device)
             for i in range(0, n_windows, _BATCH.value)]
  tokens = wins.size
  with torch.inference_mode():
    _time(lambda x: model(input_ids=x, use_cache=False), batches[:1])  # warm-up
    full = _time(lambda x: model(input_ids=x, use_cache=False), batches)
    stack = _time(lambda x: model.base_model(input_ids=x, use_cache=False), batches)

  sites = extract.resolve_sites(model, [_SITE.value])
  hooked = extract.Hooked(model, sites)
  with tempfile.TemporaryDirectory() as out:
    cfg = extract.ExtractConfig(model=_MODEL.value, num_tokens=tokens, ctx_len=_CTX.value,
                                batch_size=_BATCH.value, out=out, shard_tokens=8192)
    wps = cfg.shard_tokens // cfg.ctx_len
    num_shards = -(-n_windows // wps)
    store_writer.init_store(out, {"sites": [sites[0][0]], "d_in": model.config.hidden_size,
                           "dtype": cfg.dtype, "ctx_len": cfg.ctx_len,
                           "num_shards": num_shards})
    stats = extract.extract_shards(cfg, hooked, tok, list(range(num_shards)), wps, n_windows,
                                   extract._special_ids(tok), device)
  layer = layer_index(sites[0][0], extract.decoder_layers(model)[0]) + 1
  n_layers = model.config.num_hidden_layers
  result = {
      "model": source["id"], "device": device, "site": sites[0][0], "tokens": tokens,
      "ctx_len": _CTX.value, "batch_size": _BATCH.value, "torch_threads": torch.get_num_threads(),
      "full_forward_tok_s": tokens / full, "decoder_stack_tok_s": tokens / stack,
      "jaxsae_extract_tok_s": stats["tokens"] / stats["seconds"],
      "jaxsae_fraction_in_model": stats["model_seconds"] / stats["seconds"],
      "speedup_vs_full_forward": full / stats["seconds"],
      "speedup_vs_decoder_stack": stack / stats["seconds"],
      "ideal_speedup_vs_decoder_stack": n_layers / layer,
  }
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  app.run(main)
