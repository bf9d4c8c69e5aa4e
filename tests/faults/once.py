"""A result computed once per pytest run, however many pytest-xdist workers ask for it.

A module- or session-scoped fixture runs once per worker, and pytest-xdist's `load` schedule
deals a module's tests out to every worker in turn, so each would compute it again. Here the
first worker to ask computes it, under a lock in the run's own temporary directory (which all
its workers share, and which the next run does not reuse); the others wait for it and read it.
"""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import tempfile
from typing import Any, Callable


def once_per_run(tmp_path_factory, name: str, make: Callable[[pathlib.Path], Any]) -> Any:
  """`make(directory)`'s JSON-able value, computed by one process of this pytest run (in a new
  directory of its own, kept for the others to read) and read back by every other."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):  # the worker's own; its parent is the run's
    root = root.parent
  done = root / f"{name}.json"
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when closed, or if this process dies
    if not done.exists():  # nobody has, or whoever tried failed: compute it here
      value = make(pathlib.Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root)))
      tmp = root / f"{name}.json.tmp"
      tmp.write_text(json.dumps(value))
      os.replace(tmp, done)
  return json.loads(done.read_text())
