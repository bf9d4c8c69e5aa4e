"""Extraction throughput: jaxsae's truncated forward against a plain full forward.

  python bench/bench_extract.py --num_tokens=32768 --ctx_len=256 --batch_size=8

Both run the same model over the same windows of the default corpus in the same process. The
full forward is timed twice: the whole causal LM (with the vocabulary projection, what a
`model(ids)` call costs) and its decoder stack alone (`model.model`). jaxsae's side is the real
`extract_shards` path: hooks, packing, bf16 conversion and shard writing included.
"""

from __future__ import annotations

import json
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
import torch

from jaxsae import corpus
from jaxsae import extract
from jaxsae import store_writer

_MODEL = flags.DEFINE_string("model", extract.DEFAULT_MODEL, "Model to benchmark.")
_SITE = flags.DEFINE_string("site", "middle", "Site to extract.")
_TOKENS = flags.DEFINE_integer("num_tokens", 32768, "Token positions per measurement.")
_CTX = flags.DEFINE_integer("ctx_len", 256, "Window length.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Windows per forward.")
_DEVICE = flags.DEFINE_string("device", "auto", "torch device.")


def _time(fn, batches) -> float:
  t = time.perf_counter()
  for x in batches:
    fn(x)
  if torch.cuda.is_available():
    torch.cuda.synchronize()
  return time.perf_counter() - t


def main(_):
  device = ("cuda" if torch.cuda.is_available() else "cpu") if _DEVICE.value == "auto" \
      else _DEVICE.value
  source = extract.model_source(_MODEL.value)
  model, tok = extract.load_model(source, device)
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
    stack = _time(lambda x: model.model(input_ids=x, use_cache=False), batches)

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
  layer = int(sites[0][0].split(".")[2]) + 1
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
