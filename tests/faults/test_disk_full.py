"""A disk that fills up (RLIMIT_FSIZE on the process) during extraction and during
checkpointing: one clear error, the store and checkpoints left valid, and a rerun with space
completes to the result of a run that never ran out."""

from __future__ import annotations

import pytest

from jaxsae import store
from jaxsae import train
from jaxsae.errors import JaxsaeError

from .conftest import (exported, extract_args, files, one_line_error, same_params, train_args,
                       train_config)


def test_extraction_out_of_space_then_resumed(forks, tiny_model_dir, text_dir, clean_extraction,
                                              tmp_path, ledger):
  sizes = [len(v) for k, v in sorted(clean_extraction.items()) if k.endswith(".bin")]
  # Room for the first shards, not for the first one larger than all before it: the disk
  # fills up part way through.
  grow = [i for i in range(1, len(sizes)) if sizes[i] > max(sizes[:i])]
  limit = max(sizes[:grow[0]]) if grow else sizes[0] - 1
  out = tmp_path / "s"
  args = extract_args(tiny_model_dir, text_dir, out)
  # No file may grow past `limit` in its process: a write past it fails as on a full disk.
  proc = forks.run(*args, fsize=limit)
  ledger.add("injected")
  line = one_line_error(proc, "extract")
  assert "writing a shard" in line and "File too large" in line and "rerun" in line
  ledger.add("clear_error")
  done = store.written_shards(str(out))
  assert len(done) == (grow[0] if grow else 0)
  now = files(out)  # what was reported written is whole; no temporaries, no claims
  assert not [name for name in now if ".tmp-" in name or name.endswith(".claim")]
  assert ledger.intact(all(data == clean_extraction[name] for name, data in now.items()
                           if name.startswith("shard_")))
  with pytest.raises(JaxsaeError, match="incomplete"):
    store.Store(str(out))
  proc = forks.run(*args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert ledger.intact(files(out) == clean_extraction)


def test_checkpoint_out_of_space_then_resumed(forks, train_store, train_reference, tmp_path,
                                              ledger):
  out = tmp_path / "run"
  with pytest.raises(KeyboardInterrupt):
    train.run(train_config(train_store, out), interrupt_at=20)  # checkpoints 10 and 20
  # No limit on the arrays' ~48 KB fails every checkpoint: ocdbt packs them into as many data
  # files as its flushes happen to make (one of 48 KB, or pieces that may all fit). The tree's
  # metadata is one file, the same at every step, so a limit just under it fails the next
  # checkpoint whatever its layout; the run's own files stay below it (metrics.jsonl grows only
  # to the uninterrupted run's).
  tree = (out / "checkpoints" / "20" / "default" / "_METADATA").stat().st_size
  assert max(p.stat().st_size for p in (out / "run.json", train_reference / "metrics.jsonl")) \
      < tree - 1
  proc = forks.run(*train_args(train_store, out), fsize=tree - 1)
  ledger.add("injected")
  line = one_line_error(proc, "train")
  assert "writing a checkpoint" in line and "File too large" in line
  assert "the last complete one is step 20" in line
  ledger.add("clear_error")
  assert sorted(p.name for p in (out / "checkpoints").iterdir()
                if "tmp" not in p.name) == ["10", "20"]
  train.run(train_config(train_store, out))  # resumes from 20, the failed 30 cleaned away
  assert ledger.intact(same_params(exported(out), exported(train_reference)))
