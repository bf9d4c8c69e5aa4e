"""One site of a store, without its massive rows, as a store of its own.

  python -m experiments.drop_massive_rows --store=out/experiments/cpu/layers/store \
      --site=model.layers.15 --out=out/nofirst15

Drops each window's first stored token, then any row left whose norm is over --over times the
median: the rows that carry SmolLM2's massive residual-stream activations (the sites study,
experiments/README.md). Training on the result tests whether those rows are what makes seeds
disagree there. The rows kept are written in store order, bfloat16, each as its own window.
"""

from __future__ import annotations

from absl import app
from absl import flags
import numpy as np

from experiments import depth_study as ds
from jaxsae import store as store_lib
from jaxsae import store_writer

def kept_rows(st: store_lib.Store) -> tuple[np.ndarray, np.ndarray]:
  """(global row indices, token ids) of every row but each window's first stored one."""
  rows, ids_kept = [], []
  for i in range(len(st.shards)):
    ids, pos = st.tokens(i)
    window = pos // ids.shape[1]
    first = np.r_[True, window[1:] != window[:-1]]
    rows.append(st.offsets[i] + np.flatnonzero(~first))
    ids_kept.append(ids.reshape(-1)[pos[~first]])
  return np.concatenate(rows), np.concatenate(ids_kept).astype(np.int32)


def main(_):
  st = store_lib.Store(_STORE.value)
  rows, ids = kept_rows(st)
  x = np.asarray(st.rows(rows, site=_SITE.value), np.float32)
  norms = np.linalg.norm(x, axis=1)
  keep = norms <= _OVER.value * np.median(norms)
  print(f"{_SITE.value}: dropped {st.num_tokens - len(rows)} window-first rows and "
        f"{int((~keep).sum())} more over {_OVER.value}x the median norm, of {st.num_tokens}")
  print("before:", ds.outliers(st.rows(np.arange(0, st.num_tokens, 8), site=_SITE.value)))
  print("after: ", ds.outliers(x[keep][::8]))
  store_writer.write_store(_OUT.value, x[keep], ids=ids[keep], rows_per_shard=65_536,
                           dtype="bfloat16", sites=(_SITE.value,))
  print(f"wrote {int(keep.sum()):,} rows to {_OUT.value}")


if __name__ == "__main__":
  # Defined here, not on import: a process that imports kept_rows (the tests) may also import
  # experiments.run, whose --store, --site and --out are absl's same global flags.
  _STORE = flags.DEFINE_string("store", None, "Store to read.", required=True)
  _SITE = flags.DEFINE_string("site", None, "Site to keep.", required=True)
  _OUT = flags.DEFINE_string("out", None, "Directory of the new store.", required=True)
  _OVER = flags.DEFINE_float("over", ds.MASSIVE, "Also drop rows whose norm is over this x the "
                             "median; default what the sites study counts as massive.")
  app.run(main)
