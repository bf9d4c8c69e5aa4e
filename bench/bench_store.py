"""What each store dtype costs: bytes per token, read speed, and error against float32.

  python bench/bench_store.py --d_in=768 --rows=262144 --rows_per_shard=65536 \
      --batch_size=16384 --steps=8 --rounds=3 --dtypes=bfloat16,int8
  python bench/bench_store.py --source=out/demo/store --rows=65536 --d_in=576
  python bench/bench_store.py --reference=F32_STORE --stores=BF16,INT8,FP8  # stored-row error

The first forms write the same rows (read from --source, or heavy-tailed random ones) as a
store in each --dtypes, then time, for --rounds interleaved rounds (so that a busy machine
slows every dtype alike), --steps batches of each of:

  device_rows_per_s   the trainer's path: `Store.batches(stored=True)` with its prefetch and
                      worker threads, rows as stored placed on the devices (jax.device_put
                      with the trainer's batch sharding), each batch waited for; timed from
                      the first batch's arrival, as the trainer's clock is
  host_rows_per_s     float32 rows on the host, one batch after another (`Store.batch`: what
                      match and consensus read)
  gather_rows_per_s   the machine's own limit for the work, beside them: one thread taking
                      the same number of random rows of the same width and dtype (codes and
                      scales for 8-bit stores) from all the store's rows in memory with
                      np.take into preallocated arrays
                      (mode="clip": np.take's default mode copies through a temporary when
                      given `out`, at about half the speed)

The stores are freshly written and read once untimed, so their files sit in the page cache:
this is the gather, copy and placement cost, not a disk's. One JSON row per dtype: bytes per
token on disk (codes + scales; token ids apart), the rates (medians over rounds), and the
relative L2 error per row against the float32 rows written.

The last form compares stores of the same tokens (e.g. `jaxsae extract` run at each --dtype)
row by row against --reference: the error each dtype really stores.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16", "int8", "float8_e4m3fn"],
                            "Store dtypes to compare.")
_SOURCE = flags.DEFINE_string("source", None, "A store to take rows from; random rows if unset.")
_ROWS = flags.DEFINE_integer("rows", 65536, "Rows written per store.")
_D_IN = flags.DEFINE_integer("d_in", 576, "Row width of random rows (a --source sets its own).")
_ROWS_PER_SHARD = flags.DEFINE_integer("rows_per_shard", 16384, "Rows per shard.")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Rows per batch, as the trainer reads them.")
_STEPS = flags.DEFINE_integer("steps", 64, "Batches per timed round.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Interleaved rounds per dtype.")
_PREFETCH = flags.DEFINE_integer("prefetch", None, "Batches read ahead on the trainer's path; "
                                  "default the reader's (2 per worker).")
_WORKERS = flags.DEFINE_integer("workers", 0, "Reader threads on the trainer's path; 0: the "
                                "reader's default (one per core, at most 4).")
_REFERENCE = flags.DEFINE_string("reference", None, "A float32 store to compare --stores with.")
_STORES = flags.DEFINE_list("stores", [], "Stores of --reference's tokens, compared row by row.")


def rel_err(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
  """Relative L2 error of each row of `x` against `ref` (rows of zeros left out)."""
  norm = np.linalg.norm(ref, axis=1)
  keep = norm > 0
  return np.linalg.norm(x - ref, axis=1)[keep] / norm[keep]


def store_bytes(st) -> int:
  """Bytes of the store's activation files: codes plus, for 8-bit dtypes, scales."""
  total = 0
  for s in st.shards:
    for name in (s["file"], s.get("scales_file")):
      if name:
        total += os.path.getsize(os.path.join(st.directory, name))
  return total


def source_rows() -> np.ndarray:
  from jaxsae import store
  if _SOURCE.value:
    st = store.Store(_SOURCE.value)
    return st.rows(np.arange(min(_ROWS.value, st.num_tokens)))
  rng = np.random.default_rng(0)  # row norms spread over a decade, as real activations'
  x = rng.normal(size=(_ROWS.value, _D_IN.value)) * np.exp(rng.normal(0, 0.5, (_ROWS.value, 1)))
  return x.astype(np.float32)


def compare() -> None:
  from jaxsae import store
  ref = store.Store(_REFERENCE.value)
  if ref.manifest["dtype"] != "float32":
    raise SystemExit(f"--reference={_REFERENCE.value} holds {ref.manifest['dtype']}, not float32")
  want = ref.rows(np.arange(ref.num_tokens))
  for path in _STORES.value:
    st = store.Store(path, verify="sha256")
    if st.num_tokens != ref.num_tokens or any(
        not np.array_equal(st.tokens(i)[0], ref.tokens(i)[0]) for i in range(len(st.shards))):
      raise SystemExit(f"{path} does not hold the tokens of {_REFERENCE.value}")
    e = rel_err(st.rows(np.arange(st.num_tokens)), want)
    print(json.dumps({"store": path, "dtype": st.manifest["dtype"], "rows": int(st.num_tokens),
                      "bytes_per_token": store_bytes(st) / st.num_tokens,
                      "rel_l2_err_mean": float(e.mean()), "rel_l2_err_max": float(e.max())}),
          flush=True)


def gather_rate(codes: np.ndarray, scales: np.ndarray | None, n: int, steps: int) -> float:
  """Rows/s of one thread taking `n` random rows of `codes` (and of an 8-bit store's `scales`:
  a row of it is both) from memory into preallocated arrays."""
  raw = codes.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[codes.dtype.itemsize])
  out = np.empty((n, raw.shape[1]), raw.dtype)
  out_scales = np.empty(n, np.float32)
  idx = np.random.default_rng(0).integers(0, len(raw), (steps + 1, n))
  for k, i in enumerate(idx):
    if k == 1:
      t = time.perf_counter()
    np.take(raw, i, axis=0, out=out, mode="clip")
    if scales is not None:
      np.take(scales, i, out=out_scales, mode="clip")
  return steps * n / (time.perf_counter() - t)


def bench() -> None:
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  from jaxsae import store_writer
  x = source_rows()
  sharding = NamedSharding(jax.make_mesh((1, jax.device_count()), ("seed", "data")),
                           P("data", None))
  with tempfile.TemporaryDirectory() as tmp:
    stores = {d: store_writer.write_store(os.path.join(tmp, d), x, dtype=d,
                                          rows_per_shard=_ROWS_PER_SHARD.value)
              for d in _DTYPES.value}
    # Every row's codes as stored, in memory: what the gather-rate reference takes rows from
    # (as many rows as the stream draws from, so neither gathers from a cache-sized array).
    codes = {d: [np.concatenate([st.stored(i)[p][:, 0] for i in range(len(st.shards))])
                 if st.stored(0)[p] is not None else None for p in (0, 1)]
             for d, st in stores.items()}
    steps_per_epoch = len(x) // _BATCH.value
    for st in stores.values():  # one untimed pass: checksums, memory maps, page cache
      for _ in st.batches(_BATCH.value, num_steps=steps_per_epoch, prefetch=0):
        pass
    times = {d: {"device": [], "host": [], "gather": []} for d in stores}
    n = _STEPS.value * _BATCH.value
    for r in range(_ROUNDS.value):
      start = (r * _STEPS.value) % max(steps_per_epoch, 1)
      for d, st in stores.items():
        # Timed from the first batch's arrival, as the trainer's clock is: a stream runs for
        # thousands of steps, and its threads' start is not its rate.
        stream = st.batches(_BATCH.value, start_step=start, num_steps=_STEPS.value + 1,
                            sharding=sharding, stored=True, prefetch=_PREFETCH.value,
                            workers=_WORKERS.value or None)
        jax.block_until_ready(next(stream).x)
        t = time.perf_counter()
        for b in stream:
          jax.block_until_ready(b.x)
        times[d]["device"].append(n / (time.perf_counter() - t))
        t = time.perf_counter()
        for step in range(start, start + _STEPS.value):
          st.batch(step, _BATCH.value)
        times[d]["host"].append(n / (time.perf_counter() - t))
        times[d]["gather"].append(gather_rate(*codes[d], _BATCH.value, _STEPS.value))
    for d, st in stores.items():
      e = rel_err(st.rows(np.arange(len(x))), x)
      rate = {k: float(np.median(v)) for k, v in times[d].items()}
      print(json.dumps({
          "dtype": d, "d_in": x.shape[1], "rows": len(x), "batch_size": _BATCH.value,
          "bytes_per_token": store_bytes(st) / len(x),
          "device_rows_per_s": round(rate["device"]), "host_rows_per_s": round(rate["host"]),
          "gather_rows_per_s": round(rate["gather"]),
          "device_over_gather": round(rate["device"] / rate["gather"], 3),
          "rel_l2_err_mean": float(e.mean()), "rel_l2_err_max": float(e.max())}), flush=True)


def main(_):
  compare() if _REFERENCE.value else bench()


if __name__ == "__main__":
  app.run(main)
