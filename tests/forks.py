"""Runs command lines (`jaxsae ARGS`, a script's or a module's) each in a process of its own,
forked from one server that imported their modules once, so that a test pays for importing jax,
torch and transformers once, not at every process it starts.

  python tests/forks.py [MODULE ...]   (from the repository root; ForkServer below drives it)

The server imports each MODULE, then takes requests on stdin, one JSON object a line:

  {"args": [...], "script": PATH or null, "module": NAME or null, "warm": [MODULE, ...],
   "out": FILE, "err": FILE, "env": {NAME: VALUE}, "cwd": DIR or null,
   "pause": [WHAT, N, MARKER] or null, "fsize": BYTES or null}

For each it imports the `warm` modules it has not yet (a script's own imports, say), then forks.
The fork takes `env` as its whole environment and `cwd` as its directory where one is given,
then runs `jaxsae.cli.main(["jaxsae", *args])` as `python -m jaxsae.cli ARGS` would; with a
script, runs it as `python PATH ARGS` would (`__main__`, its directory first on sys.path); with
a module, as `python -m NAME ARGS` would (the directory first on sys.path). stdout and stderr go
to the two FILEs. The environment takes effect as in a new process for what is read when it is
used (XLA_FLAGS when jax's backend starts, jaxsae's own settings), not for what a module the
server imported read at its import (JAX_PLATFORMS, huggingface_hub's constants).

It ends as that process would: the status of its SystemExit, or a traceback and 1 for any other
exception, once its threads are joined and its atexit handlers have run (only the interpreter's
teardown of every module is skipped: 2 s with torch and jax loaded). The server answers
`{"pid": PID}` once it forked and `{"pid": PID, "code": STATUS}` once that process ended (-9
after a SIGKILL, as subprocess says); it reads the next request without waiting, so processes
may run side by side (two "hosts" of a run, say). Nothing the server imports starts a JAX
backend or a torch thread pool, so a fork starts them afresh, as a new process would (numpy's
BLAS and pyarrow's allocator threads are fork-safe).

pause: WHAT is `shard` (the store's shard writer, after the bytes are written to the temporary
file and before its fsync and rename) or `checkpoint` (orbax's commit of a checkpoint's
temporary directory, after its arrays are written and before the rename that completes it). At
the N-th such call the process writes the path to MARKER and sleeps until it is killed: a kill
timed by a test's clock could land anywhere, this one lands inside the write.

fsize: the process may grow no file past BYTES (RLIMIT_FSIZE, with SIGXFSZ ignored, else the
kernel kills it): a write past it fails with "File too large", as on a full disk.
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import resource
import runpy
import select
import signal
import subprocess
import sys
import threading
import time


def plant_pause(what: str, n: int, marker: str) -> None:
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
    raise SystemExit(f"forks.py: unknown pause point {what!r}")


def _import(modules) -> None:
  for module in modules:
    try:
      importlib.import_module(module)
    except Exception:  # the process that needs it fails on it itself, as it would alone
      pass


def serve(answers: int) -> dict | None:
  """Forks once a request; returns the request in the fork, None in the server at stdin's end.

  The forks may run side by side: a thread reaps each as it ends and answers its status."""
  started = threading.Semaphore(0)  # one release a fork: the reaper waits for one to exist

  def reap():
    while True:
      started.acquire()
      pid, status = os.wait()
      os.write(answers, (json.dumps({"pid": pid, "code": os.waitstatus_to_exitcode(status)})
                         + "\n").encode())

  threading.Thread(target=reap, daemon=True).start()
  for line in sys.stdin:
    request = json.loads(line)
    _import(request.get("warm") or ())
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
      return request
    os.write(answers, (json.dumps({"pid": pid}) + "\n").encode())
    started.release()
  return None


def main() -> None:
  answers = os.dup(1)  # the requests' answers; anything printed by the server goes to stderr
  os.dup2(2, 1)
  sys.path[0] = os.getcwd()  # the repository, as for `python -m jaxsae.cli` (not tests/)
  _import(sys.argv[1:])
  request = serve(answers)
  if request is None:
    return
  # The fork: the request's process.
  os.close(answers)
  os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
  for fd, path in ((1, request["out"]), (2, request["err"])):
    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
  os.environ.clear()
  os.environ.update(request["env"])
  if request.get("cwd"):
    os.chdir(request["cwd"])
  if request.get("fsize") is not None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (request["fsize"], request["fsize"]))
  if request.get("pause"):
    what, n, marker = request["pause"]
    plant_pause(what, int(n), str(marker))
  script, module = request.get("script"), request.get("module")
  code = 0
  try:
    if script:
      sys.argv = [script, *request["args"]]
      sys.path[0] = os.path.dirname(os.path.abspath(script))
      runpy.run_path(script, run_name="__main__")
    elif module:
      sys.argv = [module, *request["args"]]
      sys.path[0] = os.getcwd()
      runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
      sys.argv = ["jaxsae", *request["args"]]
      sys.path[0] = os.getcwd()
      from jaxsae import cli
      cli.main(sys.argv)
  except SystemExit as e:
    if e.code is None or isinstance(e.code, int):
      code = e.code or 0
    else:
      print(e.code, file=sys.stderr)
      code = 1
  except BaseException:  # as the interpreter: the traceback, and status 1
    sys.excepthook(*sys.exc_info())
    code = 1
  # The interpreter's exit (non-daemon threads joined, atexit handlers, buffers flushed), less
  # its teardown of every module.
  threading._shutdown()
  atexit._run_exitfuncs()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


# ---------------------------------------------------------------------------------------------
# The client, in the test's process.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Fork:
  """A process the fork server started: subprocess.Popen's pid, poll, wait,
  send_signal, kill and returncode; its stdout and stderr once it ended."""

  def __init__(self, server: ForkServer, args: list[str], pid: int, out: str, err: str):
    self.server, self.args, self.pid, self._out, self._err = server, args, pid, out, err
    self.returncode: int | None = None

  def poll(self) -> int | None:
    if self.returncode is None:
      self.returncode = self.server.ended(self.pid, 0)
    return self.returncode

  def wait(self, timeout: float | None = None) -> int:
    """Its exit status; past `timeout` seconds it is killed and TimeoutExpired raised."""
    if self.returncode is None:
      self.returncode = self.server.ended(self.pid, timeout)
      if self.returncode is None:
        self.kill()
        self.wait()
        raise subprocess.TimeoutExpired(self.args, timeout)
    return self.returncode

  def send_signal(self, sig: int) -> None:
    if self.poll() is None:  # not ended, so not reaped: the pid is still this process's
      os.kill(self.pid, sig)

  def kill(self) -> None:
    self.send_signal(signal.SIGKILL)

  def completed(self, timeout: float | None = None) -> subprocess.CompletedProcess:
    self.wait(timeout)
    with open(self._out) as out, open(self._err) as err:
      return subprocess.CompletedProcess(self.args, self.returncode, out.read(), err.read())


class ForkServer:
  """Command lines in processes of their own, forked from this file's server, which imported
  their modules once: a start costs milliseconds, not the seconds of importing jax, torch and
  transformers again (see the module's docstring)."""

  def __init__(self, tmp, modules=()):
    """Starts the server, which imports `modules` (in the background: a request waits), in
    this process's environment; each process it starts has the environment and directory
    `start` gives it."""
    self.tmp, self.n = str(tmp), 0
    self._log = open(os.path.join(self.tmp, "server.log"), "w")
    self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), *modules], cwd=ROOT,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log)
    self._buf = b""
    self._started: list[int] = []  # pids answered, not yet taken by start()
    self._ended: dict[int, int] = {}  # pid -> exit status
    self.forks: list[Fork] = []

  def _read(self, timeout: float | None) -> bool:
    """Reads the answers there are, waiting up to `timeout` seconds (None: forever) for one;
    whether one came."""
    if b"\n" not in self._buf:
      if not select.select([self.proc.stdout], [], [], timeout)[0]:
        return False
      data = os.read(self.proc.stdout.fileno(), 65536)
      if not data:
        raise RuntimeError(f"the fork server ended; see {self._log.name}")
      self._buf += data
    *lines, self._buf = self._buf.split(b"\n")
    for answer in map(json.loads, lines):
      if "code" in answer:
        self._ended[answer["pid"]] = answer["code"]
      else:
        self._started.append(answer["pid"])
    return bool(lines)

  def ended(self, pid: int, timeout: float | None) -> int | None:
    """`pid`'s exit status once it ended, waiting up to `timeout` seconds; None if it runs on."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while pid not in self._ended:
      left = None if deadline is None else max(0.0, deadline - time.monotonic())
      if not self._read(left) and left is not None and left <= 0:
        return None
    return self._ended.pop(pid)

  def start(self, *args, script: str | None = None, module: str | None = None, warm=(),
            env: dict | None = None, cwd: str | None = None,
            pause: tuple[str, int, str] | None = None, fsize: int | None = None) -> Fork:
    """Starts `jaxsae ARGS` (or `python SCRIPT ARGS`, `python -m MODULE ARGS`) in `cwd` (else the
    repository root) with `env` as its whole environment (else this process's now, as
    subprocess would give it), with a pause planted in a writer or a limit on file sizes; the
    server first imports the `warm` modules it lacks."""
    self.n += 1
    out, err = (os.path.join(self.tmp, f"{self.n}.{ext}") for ext in ("out", "err"))
    request = {"args": list(map(str, args)), "script": script, "module": module,
               "warm": list(warm), "out": out, "err": err, "fsize": fsize,
               "env": dict(os.environ if env is None else env),
               "cwd": None if cwd is None else str(cwd),
               "pause": None if pause is None else list(map(str, pause))}
    self.proc.stdin.write((json.dumps(request) + "\n").encode())
    self.proc.stdin.flush()
    while not self._started:
      self._read(None)
    fork = Fork(self, [script or module or "jaxsae", *request["args"]], self._started.pop(0),
                out, err)
    self.forks = [f for f in self.forks if f.returncode is None] + [fork]
    return fork

  def run(self, *args, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    """`start(*ARGS, ...)` run to its end: its exit status, stdout and stderr."""
    return self.start(*args, **kw).completed(timeout)

  def close(self) -> None:
    for fork in self.forks:  # any a test left running (paused in a writer, say)
      if fork.poll() is None:
        fork.kill()
        fork.wait()
    # The server holds nothing to save, and its interpreter's teardown costs seconds.
    self.proc.kill()
    self.proc.wait()
    self.proc.stdin.close()
    self.proc.stdout.close()
    self._log.close()


if __name__ == "__main__":
  main()
