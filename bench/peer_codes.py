"""Do jaxsae's exports encode the same in SAELens and sparsify, on a real store's rows?

  python bench/peer_codes.py --store=out/demo/store --out=/tmp/peer_codes

For every architecture, with --normalize off and on, trains one short seed on the store
(`jaxsae train --layouts=saelens`, plus sparsify's layout for TopK), then encodes --rows of the
store's rows three ways: jaxsae's reader of the export (what `jaxsae match` uses), SAELens's
`SAE.load_from_disk(...).encode`, and for TopK sparsify's `SparseCoder.load_from_disk(...)
.encode`. Reported per export: the largest code difference relative to the largest code, and
the fraction of rows whose set of active latents differs at all. tests/test_peers.py pins
the same on random rows; this measures it where it matters, on the activations SAEs see.
"""

from __future__ import annotations

import json
import os

from absl import app
from absl import flags
import numpy as np

_STORE = flags.DEFINE_string("store", "out/demo/store", "The activation store to train and encode on.")
_OUT = flags.DEFINE_string("out", "/tmp/peer_codes", "Where the short runs go.")
_ROWS = flags.DEFINE_integer("rows", 4096, "Store rows to encode.")
_LATENTS = flags.DEFINE_integer("num_latents", 2304, "SAE width.")
_TOKENS = flags.DEFINE_integer("num_tokens", 65536, "Training tokens per run.")


def dense_sparsify(coder, x):
  import torch
  with torch.no_grad():
    acts, idx, _ = coder.encode(torch.from_numpy(x))
    return torch.zeros(len(x), coder.num_latents).scatter(-1, idx, acts).numpy()


def compare(a, b) -> dict:
  return {"max_rel_diff": float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)),
          "rows_with_other_active_set": float(np.mean(((a > 0) != (b > 0)).any(1))),
          "mean_l0": float((b > 0).sum(1).mean())}


def main(_):
  import sae_lens
  import sparsify
  import torch
  from jaxsae import saes, store as store_lib, train
  from jaxsae.sae import ARCHITECTURES
  store = store_lib.Store(_STORE.value)
  x = np.concatenate([store.batch(s, 1024) for s in range(-(-_ROWS.value // 1024))])[:_ROWS.value]
  x = np.asarray(x, np.float32)
  rows = []
  for arch in ARCHITECTURES:
    for normalize in (False, True):
      out = os.path.join(_OUT.value, f"{arch}-{'norm' if normalize else 'raw'}")
      layouts = ("sparsify", "saelens") if arch == "topk" else ("saelens",)
      train.run(train.TrainConfig(store=_STORE.value, out=out, arch=arch,
                                  num_latents=_LATENTS.value, k=32, seeds=(0,),
                                  batch_size=1024, num_tokens=_TOKENS.value,
                                  normalize=normalize, layouts=layouts, progress=False))
      lens_dir = os.path.join(out, "seed0") if arch != "topk" else os.path.join(out, "saelens",
                                                                                "seed0")
      ours = saes.load_sae(lens_dir)
      z = np.asarray(saes.encode(*saes.encoder(ours), x, ours.input_scale))
      with torch.no_grad():
        codes = sae_lens.SAE.load_from_disk(lens_dir).encode(torch.from_numpy(x))
      row = {"arch": arch, "normalize": normalize, "saelens": compare(codes.numpy(), z)}
      if arch == "topk":
        row["sparsify"] = compare(dense_sparsify(
            sparsify.SparseCoder.load_from_disk(os.path.join(out, "seed0")), x), z)
      rows.append(row)
      print(json.dumps(row), flush=True)
  with open(os.path.join(_OUT.value, "results.json"), "w") as f:
    json.dump({"store": _STORE.value, "rows": _ROWS.value, "results": rows}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
