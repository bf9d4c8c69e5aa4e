"""NaN/Inf rows in a store: an error naming the shard and row (test_store.py's
test_non_finite_rows_are_named_at_read_time), or with --skip_non_finite skipped and counted,
resumes included. (A learning rate that makes the loss diverge: test_train.py's
test_non_finite_loss_stops_at_last_good_checkpoint.)"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from jaxsae import files as files_lib
from jaxsae import store as store_lib
from jaxsae import train
from jaxsae.errors import JaxsaeError

from .conftest import exported, metrics, same_params, train_config

BAD = {3: [5, 17, 900], 6: [2]}  # shard -> rows made non-finite


@pytest.fixture(scope="module")
def poisoned(train_store, tmp_path_factory) -> str:
  d = str(tmp_path_factory.mktemp("poisoned") / "acts")
  shutil.copytree(train_store, d)
  m = json.load(open(os.path.join(d, store_lib.MANIFEST)))
  for shard, rows in BAD.items():
    path = os.path.join(d, store_lib.shard_name(shard) + ".bin")
    x = np.fromfile(path, np.float32).reshape(-1, 16)
    x[rows, 3] = np.array([np.nan, np.inf, -np.inf])[:len(rows)]
    x.tofile(path)
    # The checksum updated to match: bytes written wrong at extraction, not damaged since.
    m["shards"][shard]["sha256"] = files_lib.sha256_file(path)
  json.dump(m, open(os.path.join(d, store_lib.MANIFEST), "w"))
  return d


def test_non_finite_rows_stop_training_naming_shard_and_row(poisoned, tmp_path, ledger):
  ledger.add("injected")
  with pytest.raises(JaxsaeError, match=r"shard_0000[36].bin at row (5|17|900|2);.*"
                                        "--skip_non_finite"):
    train.run(train_config(poisoned, tmp_path / "run"))
  ledger.add("clear_error")


def test_skip_non_finite_counts_every_skipped_row_across_a_resume(poisoned, tmp_path, ledger):
  s = store_lib.Store(poisoned)
  bad = {int(s.offsets[shard] + r) for shard, rows in BAD.items() for r in rows}
  want = sum(int(np.isin(s.batch_indices(step, 128), list(bad)).sum()) for step in range(40))
  assert want > 0
  whole = tmp_path / "whole"
  train.run(train_config(poisoned, whole, skip_non_finite=True))
  assert metrics(whole)[-1]["non_finite_skipped"] == want
  resumed = tmp_path / "resumed"
  with pytest.raises(KeyboardInterrupt):
    train.run(train_config(poisoned, resumed, skip_non_finite=True), interrupt_at=27)
  train.run(train_config(poisoned, resumed, skip_non_finite=True))
  ledger.add("injected")
  assert metrics(resumed)[-1]["non_finite_skipped"] == want  # counted once, kill or not
  assert ledger.intact(same_params(exported(resumed), exported(whole)))
  for p in exported(whole).values():
    assert all(np.isfinite(v).all() for v in p.values())
