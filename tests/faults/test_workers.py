"""Extraction workers given overlapping --shard_ranges of one store: the second is refused
(shard claims); a rerun of a killed worker's range takes over. (Disjoint ranges give the
store of one worker: test_extract.py's test_worker_split_gives_the_same_store.)"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import pytest

from jaxsae import extract
from jaxsae import store
from jaxsae import store_writer
from jaxsae.errors import JaxsaeError

from .conftest import extract_args, extract_config, files


def _claim(directory, i, **owner):
  with open(os.path.join(directory, store.shard_name(i) + ".claim"), "w") as f:
    json.dump(owner, f)


def test_claims_refuse_overlap_and_let_a_rerun_take_over(tmp_path, ledger):
  d = str(tmp_path)
  alive = subprocess.Popen(["sleep", "60"])
  try:
    here = socket.gethostname()
    for i in range(0, 4):
      _claim(d, i, pid=alive.pid, host=here, range="0:4")
    for rng, shards in (("2:6", range(2, 6)), ("0:4", range(0, 4))):  # alive: even its range
      ledger.add("injected")
      with pytest.raises(JaxsaeError, match=f"shard 2 is claimed by another extraction worker "
                                            f"\\(pid {alive.pid} on {here}, --shard_range=0:4\\)"
                                            f" that overlaps --shard_range={rng}"):
        store_writer.claim_shards(d, [2, 3, 4, 5] if rng == "2:6" else [2, 3], rng)
      ledger.add("clear_error")
    assert not os.path.exists(os.path.join(d, "shard_00004.claim"))  # nothing half-claimed
    store_writer.claim_shards(d, [4, 5], "4:6")  # disjoint: fine
  finally:
    alive.kill()
    alive.wait()
  store_writer.claim_shards(d, [2, 3], "2:4")  # its worker is gone: taken over
  for i in range(6, 8):  # a worker on another host: only a rerun of its exact range takes over
    _claim(d, i, pid=1, host="elsewhere", range="6:8")
  with pytest.raises(JaxsaeError, match="pid 1 on elsewhere"):
    store_writer.claim_shards(d, [7], "7:8")
  ledger.add("injected")
  ledger.add("clear_error")
  store_writer.claim_shards(d, [6, 7], "6:8")
  store_writer.release_shards(d, range(8))  # ours only: the gone worker's 0 and 1 are for a rerun
  assert sorted(f for f in os.listdir(d) if f.endswith(".claim")) == [
      "shard_00000.claim", "shard_00001.claim"]


def test_overlapping_workers_refused_then_the_store_completes(forks, tiny_model_dir, text_dir,
                                                              clean_extraction, tmp_path, ledger):
  out = tmp_path / "s"
  marker = tmp_path / "paused"
  # Worker A holds shards 0:8 and is inside its first shard write when worker B starts.
  a = forks.start(*extract_args(tiny_model_dir, text_dir, out, shard_range="0:8"),
                  pause=("shard", 1, marker))
  try:
    deadline = time.time() + 120
    while not marker.exists() and a.poll() is None and time.time() < deadline:
      time.sleep(0.01)
    assert marker.exists()
    ledger.add("injected")
    with pytest.raises(JaxsaeError, match=f"claimed by another extraction worker \\(pid {a.pid}"):
      extract.run(extract_config(tiny_model_dir, text_dir, out, shard_range="4:12"))
    ledger.add("clear_error")
  finally:
    a.send_signal(signal.SIGKILL)
    a.wait()
  extract.run(extract_config(tiny_model_dir, text_dir, out, shard_range="8:16"))
  extract.run(extract_config(tiny_model_dir, text_dir, out, shard_range="0:8"))  # A's rerun
  assert ledger.intact(files(out) == clean_extraction)
