"""Shared pieces of the fault suite: tiny stores and runs, and processes to kill."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from conftest import files, planted_sparse, train_config  # noqa: F401 (files: for the tests)

from jaxsae import store_writer

D_IN = 16


def kill_when(start, ready, timeout: float = 120) -> bool:
  """Starts a process (`start()`), SIGKILLs it as soon as `ready()` holds; False if it ended
  first."""
  proc = start()
  deadline = time.time() + timeout
  try:
    while proc.poll() is None and time.time() < deadline:
      if ready():
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True
      time.sleep(0.005)
    return False
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def one_line_error(proc: subprocess.CompletedProcess, command: str) -> str:
  """The error a failed CLI call printed: asserts it is one line and no traceback."""
  assert proc.returncode != 0, proc.stdout[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert lines and lines[-1].startswith(f"jaxsae {command}: error: "), proc.stderr[-3000:]
  return lines[-1]


# ---------------------------------------------------------------------------------------------
# Training on a tiny store.


@pytest.fixture(scope="session")
def train_store(tmp_path_factory) -> str:
  """8 shards x 1024 rows of a planted sparse dictionary, d_in=16."""
  path = str(tmp_path_factory.mktemp("faults_store") / "acts")
  x, _ = planted_sparse(8192, D_IN, 32, 3, 0)
  store_writer.write_store(path, (x + 0.5).astype(np.float32), rows_per_shard=1024)
  return path


def train_args(store_dir, out, **kw) -> list[str]:
  """The same run as `train_config`, as `jaxsae train` flags."""
  cfg = train_config(store_dir, out, **kw)
  out_args = ["train"]
  for f in dataclasses.fields(cfg):
    v = getattr(cfg, f.name)
    if v is None or v == f.default:
      continue
    if isinstance(v, bool):
      out_args.append(f"--{'' if v else 'no'}{f.name}")
    elif isinstance(v, tuple):
      out_args.append(f"--{f.name}={','.join(map(str, v))}")
    else:
      out_args.append(f"--{f.name}={v}")
  return out_args


@pytest.fixture(scope="session")
def train_reference(train_store, tmp_path_factory):
  """One uninterrupted run that the fault tests compare against."""
  from jaxsae import train
  out = tmp_path_factory.mktemp("faults_ref") / "run"
  train.run(train_config(train_store, out))
  return out


def exported(out, seeds=(0, 1)) -> dict:
  from jaxsae import formats
  return {s: formats.stored(os.path.join(str(out), f"seed{s}"))[0] for s in seeds}


def same_params(a, b) -> bool:
  return a.keys() == b.keys() and all(
      a[s].keys() == b[s].keys() and all(np.array_equal(a[s][k], b[s][k]) for k in a[s])
      for s in a)


def metrics(out) -> list[dict]:
  """metrics.jsonl without its timing fields (the one thing a resumed run may change), and
  without the partial last line a kill can leave (the next run drops it)."""
  import json
  out_lines = []
  with open(os.path.join(str(out), "metrics.jsonl")) as f:
    for line in f:
      try:
        out_lines.append({k: v for k, v in json.loads(line).items()
                          if not k.startswith(("tokens_per_s", "input_wait"))})
      except json.JSONDecodeError:
        break
  return out_lines


# ---------------------------------------------------------------------------------------------
# Extraction with the tiny llama.

EXTRACT = dict(sites=("model.layers.1.mlp",), num_tokens=4096, ctx_len=64, shard_tokens=256,
               batch_size=4, dtype="float32")


def extract_args(model, text, out, **kw) -> list[str]:
  """`jaxsae extract` flags of the fault suite's extraction (16 shards)."""
  flags = {**EXTRACT, **kw}
  return ["extract", f"--model={model}", f"--dataset={text}", f"--out={out}",
          *(f"--{k}={','.join(v) if isinstance(v, tuple) else v}" for k, v in flags.items())]


def extract_config(model, text, out, **kw):
  from jaxsae import extract
  return extract.ExtractConfig(model=model, dataset=text, out=str(out), **{**EXTRACT, **kw})


@pytest.fixture(scope="session")
def clean_extraction(tiny_model_dir, text_dir, tmp_path_factory):
  """The fault suite's extraction, never disturbed: {file name: bytes}."""
  from jaxsae import extract
  out = tmp_path_factory.mktemp("faults_extract") / "clean"
  extract.run(extract_config(tiny_model_dir, text_dir, out))
  return files(out)
