"""SIGKILL at seeded points of `jaxsae extract` and `jaxsae train`, inside their writers too;
a rerun then ends with the bytes and parameters of a run that was never killed."""

from __future__ import annotations

import os
import random

from jaxsae import store

from .conftest import (exported, extract_args, files, kill_when, metrics, same_params,
                       train_args)


def test_extraction_killed_three_times_resumes_to_identical_bytes(forks, tiny_model_dir,
                                                                   text_dir, clean_extraction,
                                                                   tmp_path, ledger):
  rng = random.Random(7)
  want = clean_extraction
  n = sum(1 for f in want if f.endswith(".bin"))
  out = tmp_path / "killed"
  args = extract_args(tiny_model_dir, text_dir, out)
  a, b = sorted(rng.sample(range(1, n - 2), 2))
  # Kill 1 and 3 by the clock, after a seeded number of shards and a seeded delay; kill 2
  # inside the shard writer, its temporary file written but not yet renamed.
  plans = [("clock", a, rng.uniform(0, 0.05)), ("writer", rng.randint(1, 3), 0),
           ("clock", b, rng.uniform(0, 0.05))]
  for how, at, delay in plans:
    before = len(store.written_shards(str(out))) if out.exists() else 0
    if how == "clock":
      ready = lambda: out.exists() and len(store.written_shards(str(out))) >= max(at, before + 1)
      start = lambda: forks.start(*args)
    else:
      marker = tmp_path / f"paused-{at}"
      ready = marker.exists
      start = lambda: forks.start(*args, pause=("shard", at, marker))
    landed = kill_when(start, lambda: ready() and (delay == 0 or _sleep(delay)))
    assert landed, f"{how} kill at {at}: the extraction ended first"
    ledger.add("injected")
    done = store.written_shards(str(out))
    assert len(done) < n and not (out / "manifest.json").exists()
    if how == "writer":  # the kill landed inside the write: its temporary file is left
      assert [f for f in os.listdir(out) if ".bin.tmp-" in f]
    now = files(out)  # every shard reported written is whole and right
    assert ledger.intact(all(now[store.shard_name(i) + ext] == want[store.shard_name(i) + ext]
                             for i in done for ext in (".bin", ".tokens.npz", ".json")))
  proc = forks.run(*args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert ledger.intact(files(out) == want)  # no temporaries, no claims, the same bytes


def _sleep(seconds: float) -> bool:
  import time
  time.sleep(seconds)
  return True


def test_training_killed_three_times_resumes_to_identical_parameters(forks, train_store,
                                                                     train_reference, tmp_path,
                                                                     ledger):
  rng = random.Random(11)
  out = tmp_path / "run"
  args = train_args(train_store, out)
  lines = lambda: len(metrics(out)) if (out / "metrics.jsonl").exists() else 0
  ckpts = out / "checkpoints"
  # Kill 1 and 3 by the clock once a seeded number of metric lines (5 steps each) are out;
  # kill 2 inside a checkpoint write: its arrays written, its directory not yet renamed.
  plans = [("clock", rng.randint(1, 3), rng.uniform(0, 0.05)), ("writer", rng.randint(1, 2), 0),
           ("clock", rng.randint(6, 7), rng.uniform(0, 0.05))]
  for how, at, delay in plans:
    if how == "clock":
      start, ready = lambda: forks.start(*args), lambda: lines() >= at
    else:
      marker = tmp_path / f"paused-{at}"
      start, ready = lambda: forks.start(*args, pause=("checkpoint", at, marker)), marker.exists
    assert kill_when(start, lambda: ready() and (delay == 0 or _sleep(delay))), how
    ledger.add("injected")
    assert not (out / "seed0").exists()
    if how == "writer":
      assert [f for f in os.listdir(ckpts) if "orbax-checkpoint-tmp" in f]
    got = [line for line in metrics(out) if line.get("step")]
    assert ledger.intact(got == metrics(train_reference)[:len(got)])
  proc = forks.run(*args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert ledger.intact(same_params(exported(out), exported(train_reference)))
  assert ledger.intact(metrics(out) == metrics(train_reference))  # each step logged once
