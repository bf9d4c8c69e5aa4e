"""A checkpoint directory whose newest step is complete-looking but corrupted: the run resumes
from the previous good one and says which it skipped. (Half-written ones: test_train.py's
test_half_written_checkpoints_are_skipped.)"""

from __future__ import annotations

import logging
import os

import pytest

from jaxsae import train

from .conftest import exported, same_params, train_config


def _largest_file(directory):
  paths = [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs]
  return max(paths, key=os.path.getsize)


def flip(path):
  data = bytearray(open(path, "rb").read())
  data[len(data) // 3] ^= 0x10  # inside the arrays' data: orbax alone restores other numbers
  open(path, "wb").write(bytes(data))


def truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


# A failed restore leaves an orbax/tensorstore callback that fires after its event loop
# closed; harmless, and not ours.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", [flip, truncate], ids=["flipped_bytes", "truncated_data"])
def test_corrupted_newest_checkpoint_is_skipped_and_said(train_store, train_reference, tmp_path,
                                                         caplog, ledger, damage):
  out = tmp_path / "run"
  with pytest.raises(KeyboardInterrupt):
    train.run(train_config(train_store, out), interrupt_at=30)
  ckpts = out / "checkpoints"
  assert sorted(os.listdir(ckpts)) == ["10", "20", "30"]
  damage(_largest_file(ckpts / "30"))
  ledger.add("injected")
  with caplog.at_level(logging.WARNING):
    train.run(train_config(train_store, out))
  said = [r.getMessage() for r in caplog.records if "checkpoint 30" in r.getMessage()]
  assert said and "unusable" in said[0] and "resuming from the previous one" in said[0], said
  ledger.add("clear_error")
  assert [f for f in os.listdir(ckpts) if f.startswith("unreadable-30-")]  # kept to look at
  assert ledger.intact(same_params(exported(out), exported(train_reference)))
