"""Runs many `jaxsae` command lines, each in its own process, paying for the imports once.

  python cli_table.py CASES.json RESULTS.json

CASES is a list of argument lists. Every stage module is imported first, then each case runs
`jaxsae.cli.main` in a fork of this process (nothing here has started a JAX backend or a
torch thread pool, so forking is safe), with stdout and stderr to files; RESULTS gets each
case's exit status, stdout and stderr.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile


def main() -> None:
  cases = json.load(open(sys.argv[1]))
  from jaxsae import cli
  for module, _, _ in cli.COMMANDS.values():
    __import__(module)
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    for i, args in enumerate(cases):
      out, err = os.path.join(tmp, f"{i}.out"), os.path.join(tmp, f"{i}.err")
      pid = os.fork()
      if pid == 0:
        code = 0
        try:
          for fd, path in ((1, out), (2, err)):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
          cli.main(["jaxsae", *args])
        except SystemExit as e:
          code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # a traceback: what the table looks for
          import traceback
          traceback.print_exc()
          code = 99
        finally:
          sys.stdout.flush()
          sys.stderr.flush()
          os._exit(code)
      _, status = os.waitpid(pid, 0)
      results.append({"args": args, "code": os.waitstatus_to_exitcode(status),
                      "stdout": open(out).read(), "stderr": open(err).read()})
  json.dump(results, open(sys.argv[2], "w"), indent=1)


if __name__ == "__main__":
  main()
