"""launch/: what the cloud scripts would run, two hosts over loopback, and the Colab notebook."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import socket
import subprocess
import sys

import numpy as np
import pytest
from absl import flags

from conftest import cpu_devices_env, planted_sparse

from jaxsae import cli
from jaxsae import extract
from jaxsae import formats
from jaxsae import store_writer
from jaxsae import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dry_run(script: str, *args: str, **env: str) -> list[list[str]]:
  """The commands `launch/SCRIPT` would run, each as argv, with no gcloud on the PATH."""
  proc = subprocess.run(["bash", f"launch/{script}", *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=60,
                        env={"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"),
                             "DRY_RUN": "1", **env})
  assert proc.returncode == 0, proc.stderr
  return [_argv(line) for line in proc.stdout.splitlines()
          if line.split(" ", 1)[0] in ("gcloud", "tar", "make", ".venv/bin/python",
                                       ".venv/bin/jaxsae")]


def _argv(line: str) -> list[str]:
  """A line of `printf %q` words back as argv, by bash itself (it may use $'...' quoting)."""
  out = subprocess.run(["bash", "-c", 'eval "set -- $1"; printf "%s\\0" "$@"', "_", line],
                       capture_output=True, text=True, check=True).stdout
  return out.split("\0")[:-1]


def parse(cls, argv: list[str]):
  """The config `jaxsae` would build from these flags (flagfiles read relative to the repo)."""
  fv = flags.FlagValues()
  cli.define_flags(cls, fv)
  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    rest = fv(["jaxsae", *argv])
  finally:
    os.chdir(cwd)
  return cli.config_from_flags(cls, rest[1:], fv)


def test_tpu_script_runs_the_flagfile_on_every_worker_with_checkpoints_in_the_bucket():
  cmds = dry_run("tpu.sh", TPU="sae", ZONE="us-central2-b", BUCKET="gs://b",
                 FLAGFILE="launch/paper_topk.flags")
  # First the compile, here, for the slice's topology, before any TPU VM is asked for.
  compile_cmd = cmds.pop(0)
  assert compile_cmd[0].endswith("jaxsae") and compile_cmd[1] == "train"
  cfg = parse(train.TrainConfig, compile_cmd[2:])
  assert (cfg.topology, cfg.compile_only, cfg.store) == ("v4:2x2x4", True, "gs://b/stores/default")
  assert cfg.num_latents == 32768  # the flagfile's run
  assert cmds[0][:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
  assert "--spot" in cmds[0] and "--accelerator-type=v4-32" in cmds[0]
  ssh = [c for c in cmds if c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] and "ssh" in c]
  install, train_cmd, copy = ssh
  assert "--worker=all" in install and "--worker=all" in train_cmd and "--worker=0" in copy
  assert "jax[tpu]" not in install[-1] and "./jaxsae[tpu,gcs]" in install[-1]
  line = train_cmd[-1].split("jaxsae train", 1)[1]
  argv = [a.replace("$HOME/", "launch/") for a in shlex.split(line)]
  cfg = parse(train.TrainConfig, argv)
  assert cfg.distributed and cfg.store == "gs://b/stores/default"
  assert cfg.checkpoint_dir == "gs://b/runs/paper_topk/checkpoints"
  # The paper's settings, and they pass the trainer's checks for Pythia-160M's d_in of 768.
  assert (cfg.arch, cfg.num_latents, cfg.k, cfg.num_seeds) == ("topk", 32768, 32, 8)
  plan = train.resolve(cfg, 768, 8_000_000_000)
  assert plan.num_steps == 8_000_000_000 // 16384 and plan.checkpoints.keep_steps
  assert copy[-1].split()[-1] == "gs://b/runs/paper_topk"


def test_tpu_script_refuses_missing_settings():
  proc = subprocess.run(["bash", "launch/tpu.sh"], cwd=ROOT, capture_output=True, text=True,
                        env={"PATH": "/usr/bin:/bin", "DRY_RUN": "1"})
  assert proc.returncode != 0 and "TPU" in proc.stderr


def test_extraction_workers_split_the_shards_between_them():
  """WORKERS=N WORKER=i: the ranges the script computes tile the store's shards exactly."""
  ranges = []
  for i in range(3):
    cmds = dry_run("extract_to_gcs.sh", BUCKET="gs://b", TOKENS="1000000", CTX="1024",
                   WORKERS="3", WORKER=str(i))
    (ext,) = [c for c in cmds if c[:2] == [".venv/bin/jaxsae", "extract"]]
    cfg = parse(extract.ExtractConfig, ext[2:])
    ranges.append(tuple(int(v) for v in cfg.shard_range.split(":")))
    rsync, cp = [c for c in cmds if c[0] == "gcloud"]
    assert "manifest\\.json$" in rsync and cp[-1] == "gs://b/stores/default/manifest.json"
  windows = -(-1_000_000 // 1024)
  num_shards = -(-windows // (cfg.shard_tokens // 1024))
  assert ranges[0][0] == 0 and ranges[-1][1] == num_shards
  assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_gpu_script_trains_with_its_arguments():
  cmds = dry_run("gpu.sh", "--store=s", "--num_seeds=8", "--out=o")
  assert cmds[0] == ["make", "install", "TORCH=torch"]
  assert cmds[-1] == [".venv/bin/jaxsae", "train", "--store=s", "--num_seeds=8", "--out=o"]


def _free_ports(n: int) -> list[int]:
  """n distinct ports free now (each held until all are known, so none is given twice)."""
  with contextlib.ExitStack() as stack:
    socks = [stack.enter_context(socket.socket()) for _ in range(n)]
    for s in socks:
      s.bind(("127.0.0.1", 0))
    return [s.getsockname()[1] for s in socks]


@pytest.mark.slow
def test_two_processes_over_loopback_train_like_one_host(forks, tmp_path):
  """jax.distributed over loopback, two 'hosts' of 2 CPU devices each, against one of 4.

  With seeds across the hosts (2x2) each host reads the whole batch; with the data axis across
  them (1x4) each reads its half. Both give the single-process SAEs.
  """
  x, _ = planted_sparse(4096, 16, 32, 3)
  store = str(tmp_path / "store")
  store_writer.write_store(store, (x + 0.5).astype(np.float32), rows_per_shard=1024)
  common = [f"--store={store}", "--num_latents=64", "--k=4", "--seeds=0,1", "--batch_size=128",
            "--num_tokens=2560", "--lr=1e-2", "--lr_warmup_steps=5", "--checkpoint_every=10",
            "--log_every=5", "--noprogress"]

  def start(args, devices):  # `python -m jaxsae train ...`, forked (tests/forks.py)
    return forks.start("train", *common, *args, env=cpu_devices_env(devices))

  # The single host and both pairs of hosts at once, each pair with its own coordinator: a
  # process spends most of its time starting and compiling, on one core, and a host waits for
  # its partner, so side by side they use cores that one after the other would leave idle.
  procs = {"one": start(["--mesh=2x2", f"--out={tmp_path}/one"], 4)}
  for mesh, port in zip(("2x2", "1x4"), _free_ports(2)):
    for i in range(2):
      procs[f"{mesh}-{i}"] = start([
          f"--mesh={mesh}", f"--out={tmp_path}/{mesh}", "--distributed",
          f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
          f"--process_id={i}"], 2)
  try:
    for name, p in procs.items():
      done = p.completed(timeout=300)
      assert done.returncode == 0, (name, done.stderr[-3000:])
  finally:
    for p in procs.values():  # a host whose partner failed would wait for it
      if p.poll() is None:
        p.kill()
        p.wait()
  for mesh in ("2x2", "1x4"):
    for seed in (0, 1):
      a = formats.stored(f"{tmp_path}/{mesh}/seed{seed}")[0]
      b = formats.stored(f"{tmp_path}/one/seed{seed}")[0]
      for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=1e-6, err_msg=f"{mesh} {name}")


@pytest.mark.slow
def test_colab_notebook_runs_end_to_end(tiny_model_dir, text_dir, tmp_path, monkeypatch):
  """The notebook as Colab runs it, with its settings cell at a tiny scale and no install."""
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  nb = nbformat.read(os.path.join(ROOT, "launch", "colab.ipynb"), as_version=4)
  tags = [c.metadata.get("tags", []) for c in nb.cells]
  assert any("parameters" in t for t in tags) and any("install" in t for t in tags)
  demo_flags = (f"--model={tiny_model_dir} --dataset={text_dir} --site=model.layers.2.mlp "
                "--num_tokens=16384 --ctx_len=64 --num_seeds=2 --num_latents=64 --k=4 "
                "--train_tokens=8192 --batch_size=128 --lr_warmup_steps=5")
  # The sweep's point is the demo's own training (k=4 at the demo's lr of 8e-3): the cell's
  # programs are the ones `jaxsae demo` compiled, found in XLA's cache where it is on.
  params = (f"OUT = {str(tmp_path / 'demo')!r}\nDEMO_FLAGS = {demo_flags!r}\nSWEEP_KS = (4,)\n"
            "SWEEP = dict(num_latents=64, num_seeds=2, num_tokens=8192, batch_size=128, "
            "lr=8e-3, lr_warmup_steps=5, progress=False)")
  nb.cells = [nbformat.v4.new_code_cell(params) if "parameters" in t else c
              for c, t in zip(nb.cells, tags) if "install" not in t]
  # `!jaxsae` finds this venv's command. (torch in the kernel and in `jaxsae demo` runs on the
  # one thread tests/conftest.py gives the suite's processes.)
  monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
  nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": ROOT}}).execute()
  code = [c for c in nb.cells if c.cell_type == "code"]
  text = lambda cell: "".join(o.get("text", "") for o in cell.outputs)
  demo_out = text(next(c for c in code if "jaxsae demo" in c.source))
  assert "fraction of latents shared" in demo_out and "report:" in demo_out
  images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
  assert len(images) == 4
  html = [o for c in code for o in c.outputs if "text/html" in o.get("data", {})]
  assert html and "<img" in html[0]["data"]["text/html"]
  assert re.search(r"k=4: shared [0-9.]+", text(code[-1]))
