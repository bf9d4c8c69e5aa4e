"""Runs `jaxsae ARGS` with a pause planted inside a writer, so that a test can SIGKILL it there.

  python child.py WHAT N MARKER -- ARGS...

WHAT is `shard` (the store's shard writer, after the bytes are written to the temporary file
and before its fsync and rename) or `checkpoint` (orbax's commit of a checkpoint's temporary
directory, after its arrays are written and before the rename that completes it). At the N-th
such call the process writes the path to MARKER and sleeps until it is killed: a kill timed by
a test's clock could land anywhere, this one lands inside the write.
"""

from __future__ import annotations

import os
import sys
import time


def main() -> None:
  what, n, marker = sys.argv[1], int(sys.argv[2]), sys.argv[3]
  args = sys.argv[sys.argv.index("--") + 1:]
  calls = 0

  def pause(path) -> None:
    nonlocal calls
    calls += 1
    if calls == n:
      with open(marker + ".tmp", "w") as f:
        f.write(str(path))
      os.replace(marker + ".tmp", marker)
      time.sleep(600)

  if what == "shard":
    real_fsync = os.fsync

    def fsync(fd):
      path = os.readlink(f"/proc/self/fd/{fd}")
      if ".bin.tmp-" in path:
        pause(path)
      return real_fsync(fd)

    os.fsync = fsync
  elif what == "checkpoint":
    real_rename = os.rename

    def rename(src, dst, *a, **kw):
      if "orbax-checkpoint-tmp" in str(src):
        pause(src)
      return real_rename(src, dst, *a, **kw)

    os.rename = rename
  else:
    raise SystemExit(f"child.py: unknown pause point {what!r}")

  from jaxsae import cli
  cli.main(["jaxsae", *args])


if __name__ == "__main__":
  main()
