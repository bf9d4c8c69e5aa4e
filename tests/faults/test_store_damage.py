"""A damaged or foreign store is refused before training uses it, by an error naming the shard
(or the manifest): flipped bytes, a truncated shard, a missing shard, a shard listed twice, a
manifest copied from another store, a shard swapped in from another store."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from conftest import edit_manifest

from jaxsae import store as store_lib
from jaxsae import store_writer
from jaxsae import train
from jaxsae.errors import JaxsaeError

from .conftest import train_config


def _other_store(directory, **spec) -> str:
  """A store of the same shape as the fault suite's, from other data (and model, site)."""
  other = os.path.join(os.path.dirname(directory), "other")
  x = np.random.default_rng(1).normal(size=(8192, 16)).astype(np.float32)
  store_writer.write_store(other, x, rows_per_shard=1024, **spec)
  return other


def flipped(d):
  path = os.path.join(d, "shard_00005.bin")
  data = bytearray(open(path, "rb").read())
  data[10] ^= 0xFF  # sizes still match: only the checksum can tell
  open(path, "wb").write(bytes(data))


def truncated(d):
  with open(os.path.join(d, "shard_00003.bin"), "r+b") as f:
    f.truncate(100)


def missing(d):
  os.remove(os.path.join(d, "shard_00001.bin"))


def listed_twice(d):
  edit_manifest(d, lambda m: m["shards"].__setitem__(1, m["shards"][0]))


def foreign_manifest(d):
  other = _other_store(d, model="another-model", sites=("model.layers.2.mlp",))
  shutil.copy(os.path.join(other, store_lib.MANIFEST), os.path.join(d, store_lib.MANIFEST))


def swapped_shard(d):
  other = _other_store(d)
  for ext in (".bin", ".json"):  # the shard and its ledger entry, as a careless copy would
    shutil.copy(os.path.join(other, "shard_00002" + ext), os.path.join(d, "shard_00002" + ext))


CASES = [
    (flipped, "shard_00005.bin fails its checksum"),
    (truncated, "shard_00003.bin has 100 bytes.*truncated"),
    (missing, "shard_00001.bin .* is missing"),
    (listed_twice, "lists shard shard_00000.bin twice"),
    (foreign_manifest, "manifest.json is not this store's manifest: its model='another-model'"),
    (swapped_shard, "shard_00002.bin fails its checksum"),
]


@pytest.mark.parametrize("damage,message", CASES, ids=[c[0].__name__ for c in CASES])
def test_damaged_store_is_refused_naming_the_shard(train_store, tmp_path, ledger, damage,
                                                   message):
  d = str(tmp_path / "acts")
  shutil.copytree(train_store, d)
  damage(d)
  ledger.add("injected")
  out = tmp_path / "run"
  with pytest.raises(JaxsaeError, match=message):
    train.run(train_config(d, out, checkpoint_every=1))
  ledger.add("clear_error")
  assert not (out / "seed0").exists()
  # Caught on open, or (bytes that only a checksum can tell) on the damaged shard's first
  # read: no batch holding a row of it ever reached a step.
  s = store_lib.Store.__new__(store_lib.Store)
  try:
    s.__init__(d)
  except JaxsaeError:
    return
  bad = int(message.split(".bin")[0][-5:])
  for step in range(40):
    rows = s.batch_indices(step, 128)
    if ((rows >= s.offsets[bad]) & (rows < s.offsets[bad + 1])).any():
      break
  ckpts = sorted(int(p) for p in os.listdir(out / "checkpoints") if p.isdigit())
  assert not ckpts or ckpts[-1] <= step  # checkpoints only of steps before the first such batch
