"""jaxsae's reader against Grain on the same store, batch order and batch size.

  pip install grain  # not a jaxsae dependency: this bench is the reason it is not one
  python bench/bench_loaders.py --d_in=768 --rows=262144 --rows_per_shard=65536 \\
      --batch_size=16384 --steps=8 --rounds=3

Three ways to deliver the rows of batches [start, start + steps) as the trainer's stream orders
them (`Store.batch_indices`), each timed over --rounds interleaved rounds, median rows/s:

  jaxsae          `Store.batches(stored=True)`: its thread pool, rows as stored
  grain_rows      Grain's own idiom: a MapDataset whose records are rows (a random-access source
                  over the store), `.batch()`, read by Grain's threads
  grain_batches   a MapDataset whose records are whole batches (`Store.read_batch`), so Grain
                  only schedules and prefetches them on its threads

bfloat16 rows; the store freshly written (page cache), as in bench_store.py.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

_ROWS = flags.DEFINE_integer("rows", 262144, "Rows in the store.")
_D_IN = flags.DEFINE_integer("d_in", 768, "Row width.")
_ROWS_PER_SHARD = flags.DEFINE_integer("rows_per_shard", 65536, "Rows per shard.")
_BATCH = flags.DEFINE_integer("batch_size", 16384, "Rows per batch.")
_STEPS = flags.DEFINE_integer("steps", 8, "Batches per timed round.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Interleaved rounds.")
_THREADS = flags.DEFINE_integer("threads", 2, "Reader threads for each.")


def main(_):
  import grain
  from jaxsae import store_writer
  rng = np.random.default_rng(0)
  x = rng.normal(size=(_ROWS.value, _D_IN.value)).astype(np.float32)
  B, steps, threads = _BATCH.value, _STEPS.value, _THREADS.value
  with tempfile.TemporaryDirectory() as tmp:
    st = store_writer.write_store(os.path.join(tmp, "s"), x, dtype="bfloat16",
                                  rows_per_shard=_ROWS_PER_SHARD.value)
    del x
    epoch = st.num_tokens // B

    order = np.concatenate([st.batch_indices(s, B) for s in range(epoch)])

    class Rows:  # Grain's random-access source: one record per row, in the stream's order
      def __len__(self):
        return len(order)

      def __getitem__(self, g):
        i = int(np.searchsorted(st.offsets, order[g], side="right") - 1)
        return st.stored(i)[0][order[g] - st.offsets[i], 0]

    class Batches:  # one record per batch
      def __len__(self):
        return epoch

      def __getitem__(self, step):
        return st.read_batch(step, B, stored=True).x.codes

    options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=4)

    def jaxsae_reader(start):
      for _ in st.batches(B, start_step=start, num_steps=steps, stored=True, workers=threads):
        pass

    def grain_rows(start):
      ds = grain.MapDataset.source(Rows())[start * B:(start + steps) * B].batch(B)
      for _ in ds.to_iter_dataset(options):
        pass

    def grain_batches(start):
      for _ in grain.MapDataset.source(Batches())[start:start + steps].to_iter_dataset(options):
        pass

    readers = {"jaxsae": jaxsae_reader, "grain_rows": grain_rows,
               "grain_batches": grain_batches}
    for read in readers.values():  # untimed: checksums, page cache, Grain's first setup
      read(0)
    rates = {name: [] for name in readers}
    for r in range(_ROUNDS.value):
      start = (r * steps) % max(epoch - steps, 1)
      for name, read in readers.items():
        t = time.perf_counter()
        read(start)
        rates[name].append(steps * B / (time.perf_counter() - t))
    print(json.dumps({"d_in": _D_IN.value, "batch_size": B, "threads": threads,
                      **{f"{k}_rows_per_s": round(float(np.median(v))) for k, v in
                         rates.items()}}))


if __name__ == "__main__":
  app.run(main)
