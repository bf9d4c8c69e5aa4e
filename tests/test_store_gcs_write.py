"""`jaxsae extract --out=gs://...` against a real GCS server: the store a local extraction
writes, byte for byte; resumption, refusals and claims as on local disk."""

from __future__ import annotations

import json
import re
import subprocess

import numpy as np
import pytest

from conftest import files

from jaxsae import extract
from jaxsae import gcs
from jaxsae import store
from jaxsae import store_writer
from jaxsae.errors import JaxsaeError


@pytest.fixture
def root(gcs_emulator, request):
  return f"{gcs_emulator.bucket_url}/{request.node.name}"


def _cfg(model, text, out, **kw) -> extract.ExtractConfig:
  """test_extract.py's small extraction: 4 shards of 8 windows of 64 tokens."""
  base = dict(model=model, dataset=text, sites=("model.layers.1.mlp",), num_tokens=2048,
              ctx_len=64, dtype="float32", out=str(out), shard_tokens=512, batch_size=4,
              progress=False)
  return extract.ExtractConfig(**{**base, **kw})


def objects(url: str) -> dict[str, bytes]:
  return {name: gcs.read_bytes(f"{url}/{name}") for name in gcs.list_names(url)}


@pytest.fixture(scope="module")
def local_store(tiny_model_dir, text_dir, tmp_path_factory):
  """The bfloat16 store extracted to local disk, which every gs:// one must equal."""
  out = tmp_path_factory.mktemp("local") / "s"
  extract.run(_cfg(tiny_model_dir, text_dir, out, dtype="bfloat16"))
  return out


def test_gs_store_equals_the_local_one_byte_for_byte(tiny_model_dir, text_dir, local_store,
                                                     root):
  manifest = extract.run(_cfg(tiny_model_dir, text_dir, f"{root}/s", dtype="bfloat16"))
  there = objects(f"{root}/s")
  assert there == files(local_store)  # manifest (mean norms too), ledgers, shards; no claims
  assert manifest == json.loads(there["manifest.json"])
  st = store.Store(f"{root}/s", verify="sha256")  # the reader takes it as a finished store
  np.testing.assert_array_equal(st.rows(np.arange(st.num_tokens)),
                                store.Store(str(local_store)).rows(np.arange(st.num_tokens)))


def test_sampled_mean_norms_read_by_ranges_equal_the_local_ones(local_store, root, monkeypatch):
  """A sample sparser than the store (as at paper scale), each row read as its own range."""
  for name, data in files(local_store).items():
    gcs.write_bytes(f"{root}/s/{name}", data)
  manifest = json.loads((local_store / "manifest.json").read_text())
  monkeypatch.setattr(store_writer, "NORM_SAMPLE_ROWS", 37)
  monkeypatch.setattr(store_writer, "_GCS_GAP_BYTES", 0)
  # Reads of this store only: the patch is process-wide, and a gs:// Store of an earlier test
  # on this worker may still be prefetching its shards in the background.
  reads = []
  monkeypatch.setattr(gcs, "read_range", lambda url, a, b, f=gcs.read_range: (
      url.startswith(f"{root}/s/") and reads.append((url, a, b))) or f(url, a, b))
  assert store_writer._mean_norms(f"{root}/s", manifest) == \
      store_writer._mean_norms(str(local_store), manifest)
  assert len(set(reads)) == len(reads) == 37  # one range per sampled row, none read twice


def test_killed_gs_extraction_resumes_and_completes(tiny_model_dir, text_dir, local_store,
                                                    root, monkeypatch):
  out = f"{root}/s"
  cfg = _cfg(tiny_model_dir, text_dir, out, dtype="bfloat16")
  # A worker killed inside shard 2's write: shards 0 and 1 whole, shard 2's rows uploaded but
  # not its ledger, its claim left behind.
  write = store_writer.write_shard

  def killed_in_shard_2(d, i, *a):
    if i < 2:
      return write(d, i, *a)
    gcs.write_bytes(f"{d}/{store.shard_name(i)}.bin", b"part")
    raise KeyboardInterrupt
  with monkeypatch.context() as m:  # not monkeypatch.undo(): it holds the emulator's variables
    m.setattr(store_writer, "write_shard", killed_in_shard_2)
    m.setattr(store_writer, "release_shards", lambda *a: None)  # killed: no cleanup
    with pytest.raises(KeyboardInterrupt):
      extract.run(cfg)
  assert sorted(store_writer.written_shards(out)) == [0, 1]
  names = gcs.list_names(out)
  assert "shard_00003.claim" in names and "manifest.json" not in names
  # Its claims name a pid of this host that is gone now, as a killed worker's do.
  gone = subprocess.Popen(["true"])
  gone.wait()
  for i in (2, 3):
    claim = json.loads(gcs.read_bytes(f"{out}/{store.shard_name(i)}.claim"))
    gcs.write_bytes(f"{out}/{store.shard_name(i)}.claim",
                    json.dumps({**claim, "pid": gone.pid}).encode())
  with pytest.raises(JaxsaeError, match="incomplete"):
    store.Store(out)
  ran = []
  forward = extract.Hooked.__call__
  monkeypatch.setattr(extract.Hooked, "__call__",
                      lambda self, ids: ran.append(ids.shape[0]) or forward(self, ids))
  extract.run(cfg)  # its rerun on this host: the dead pid's claims are taken over
  assert sum(ran[1:]) == 16  # only shards 2 and 3 ran; ran[0] is the width probe
  assert objects(out) == files(local_store)


def test_rerun_with_other_settings_is_refused(tiny_model_dir, text_dir, root):
  out = f"{root}/s"
  extract.run(_cfg(tiny_model_dir, text_dir, out, num_tokens=512))
  with pytest.raises(JaxsaeError, match=re.escape(out) + " holds a different store.*ctx_len"):
    extract.run(_cfg(tiny_model_dir, text_dir, out, num_tokens=512, ctx_len=32))
  gcs.write_bytes(f"{root}/other/notes.txt", b"mine")
  with pytest.raises(JaxsaeError, match="not empty"):
    extract.run(_cfg(tiny_model_dir, text_dir, f"{root}/other"))


def test_a_claimed_shard_is_refused_to_a_second_worker(root):
  d = f"{root}/s"
  store_writer.claim_shards(d, [0, 1, 2, 3], "0:4")
  # Another host's worker: no pid to look at, so only a rerun of its exact range takes over.
  other = {"pid": 1, "host": "elsewhere", "range": "4:6", "started": "2025-01-01T00:00:00"}
  for i in (4, 5):
    gcs.write_bytes(f"{d}/{store.shard_name(i)}.claim", json.dumps(other).encode())
  for rng, shards in (("2:6", [2, 3, 4, 5]), ("5:6", [5])):
    with pytest.raises(JaxsaeError, match="claimed by another extraction worker") as e:
      store_writer.claim_shards(d, shards, rng)
    assert "\n" not in str(e.value)
  assert "(pid 1 on elsewhere, --shard_range=4:6)" in str(e.value)
  store_writer.claim_shards(d, [4, 5], "4:6")  # the rerun of its range
  store_writer.claim_shards(d, [6, 7], "6:8")  # disjoint: fine
  assert not gcs.write_bytes(f"{d}/shard_00006.claim", b"x", if_absent=True)
  store_writer.release_shards(d, range(8))
  assert gcs.list_names(d) == []


def test_grow_from_a_local_store_into_gs(tiny_model_dir, text_dir, local_store, root,
                                         tmp_path):
  short = tmp_path / "short"  # 18 windows: shards 0 and 1 full
  extract.run(_cfg(tiny_model_dir, text_dir, short, dtype="bfloat16", num_tokens=1100))
  extract.run(_cfg(tiny_model_dir, text_dir, f"{root}/s", dtype="bfloat16",
                   grow_from=str(short)))
  assert objects(f"{root}/s") == files(local_store)
  with pytest.raises(JaxsaeError, match="is the store being written"):
    extract.run(_cfg(tiny_model_dir, text_dir, f"{root}/s", dtype="bfloat16",
                     grow_from=f"{root}/s/"))
