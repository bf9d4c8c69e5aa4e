"""The activation store: its format on disk, its reader, and the deterministic batch stream.

Layout of a store directory::

  spec.json                 what is being extracted (written first; a rerun must agree with it)
  shard_00000.bin           activations, raw little-endian, shape [rows, n_sites, d_in]
  shard_00000.scales.bin    8-bit stores only: float32 [rows, n_sites], max |x| of each row
  shard_00000.tokens.npz    `ids` [windows, ctx_len] int32 and `pos` [rows] int32 (row -> flat
                            position in `ids`), so any row can be shown in its context
  shard_00000.json          the shard's ledger entry: rows and checksums (written last)
  shard_00000.claim         while a worker writes the shard: its pid, host and --shard_range
  manifest.json             spec + every shard's entry (written once all shards exist)

A shard counts as written only when its ledger entry exists, and a store is finished only when
its manifest does: this module reads finished stores (store_writer.py writes them).

8-bit stores (int8, float8_e4m3fn) hold each row as codes and one float32 scale s = max |x| of
that row and site: int8 q = round(x / s * 127), float8 x / s * 448 rounded to e4m3. Every read
goes through `dequantize`, so a reader only ever sees float rows.

The batch stream is a pure function of (data_seed, step): every epoch permutes the shard order,
groups shards into buffers of `shuffle_shards`, and permutes rows within each buffer. So all SAE
seeds see the identical sequence, and a run resumed at step N reads exactly batch N next.
"""

from __future__ import annotations

import collections
import ctypes
import hashlib
import io
import json
import os
import threading
from typing import Any, Iterator, NamedTuple

import ml_dtypes
import numpy as np

from jaxsae import files
from jaxsae import gcs
from jaxsae.errors import JaxsaeError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPEC = "spec.json"
DTYPES = {
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
    "float32": np.dtype(np.float32),
    "int8": np.dtype(np.int8),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
}
# The code a row's max |x| maps to. float8 is scaled too, although the demo's activations
# (max |x| 42) fit its +-448: values past 464 become NaN (e4m3fn has no inf), and residual
# streams of larger models reach thousands; a scale also keeps small rows out of its
# subnormals (relative L2 error per row on the demo store: mean 2.5% scaled, 2.7% not).
CODE_MAX = {"int8": 127.0, "float8_e4m3fn": 448.0}
# float32, not float16: 4 bytes on a 576-byte row (0.7%) for a scale that is exact and has
# float32's range; a float16 scale would add up to 0.05% error to every element of its row
# and overflow past 65504.
SCALE_DTYPE = np.dtype("<f4")
_CODE_MAX_OF = {np_dt: CODE_MAX[name] for name, np_dt in DTYPES.items() if name in CODE_MAX}
# float8 dequantizes through a 256-entry table: ml_dtypes' float8 -> float32 cast is an
# element-by-element loop, 5.6x slower than the table's np.take ([256, 576] rows: 4.2 ms, 0.75 ms).
_FLOAT8_TABLE = np.arange(256, dtype=np.uint8).view(DTYPES["float8_e4m3fn"]).astype(np.float32)


# Integers of each stored width: rows are gathered as these (see `Store.gather`).
_RAW = {1: np.dtype(np.uint8), 2: np.dtype(np.uint16), 4: np.dtype(np.uint32)}
# Per float dtype, the exponent bits: a value is NaN or Inf exactly when they are all set.
_EXPONENT = {"bfloat16": 0x7F80, "float16": 0x7C00, "float32": 0x7F800000}
_SCAN_ROWS = 8192  # rows per step of the non-finite scan (its temporaries stay small)


def _non_finite_rows(codes: np.ndarray) -> np.ndarray:
  """Which rows [..., d_in] of stored codes hold NaN/Inf: [...] bool, from their bits alone
  (np.isfinite on ml_dtypes' types loops element by element)."""
  name = next(k for k, v in DTYPES.items() if v == codes.dtype)
  if name == "int8":
    return np.zeros(codes.shape[:-1], bool)
  raw = codes.view(_RAW[codes.dtype.itemsize])
  if name == "float8_e4m3fn":  # no Inf; NaN is S.1111.111
    return ((raw & 0x7F) == 0x7F).any(axis=-1)
  e = raw.dtype.type(_EXPONENT[name])
  return ((raw & e) == e).any(axis=-1)


# XLA's CPU client takes a host array of this alignment as it is, with no copy (measured here:
# 0.1 ms to place a 25 MB bfloat16 batch, against 22 ms for the same bytes at 16-byte alignment).
_ALIGN = 64


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
  return _BUFFERS.empty(shape, dtype)


class _Lease:
  """One buffer lent by `_Buffers`. Arrays made from it (and every view of them) have it as
  their numpy base, so it lives while any of them does; then its memory goes back."""

  def __init__(self, pool: "_Buffers", raw: np.ndarray, nbytes: int):
    self._pool, self._raw, self._nbytes = pool, raw, nbytes
    skip = -raw.ctypes.data % _ALIGN
    self.__array_interface__ = {"data": (raw.ctypes.data + skip, False), "shape": (nbytes,),
                                "typestr": "|u1", "version": 3}

  def __del__(self):
    self._pool.put(self._raw, self._nbytes)


class _Buffers:
  """Aligned host buffers for batches, reused. A batch's 25 MB (16,384 bfloat16 rows of 768)
  taken fresh from malloc each step is memory the kernel maps and zeroes page by page, and
  unmaps when freed, stalling the other reader threads (measured here: 2 reader threads
  swung between 0.7 and 3.5M rows/s, their system time with it)."""

  def __init__(self, keep: int = 32):
    self.keep, self.free = keep, collections.defaultdict(list)
    self.lock = threading.RLock()  # __del__ may put back from inside `empty`, on any thread

  def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    with self.lock:
      free = self.free[nbytes]
      raw = free.pop() if free else None
    if raw is None:
      raw = np.empty(nbytes + _ALIGN, np.uint8)
    return np.asarray(_Lease(self, raw, nbytes)).view(dtype).reshape(shape)

  def put(self, raw: np.ndarray, nbytes: int) -> None:
    with self.lock:
      free = self.free[nbytes]
      if len(free) < self.keep:
        free.append(raw)


_BUFFERS = _Buffers()


class Rows(NamedTuple):
  """Rows as the store holds them, as they travel to the devices: codes [..., d_in] in the
  store's dtype and, for 8-bit stores, each row's factor scale / code_of_max [...] float32
  (None for float stores). A bfloat16 batch moves half the bytes of its float32 rows, an int8
  one a quarter; the devices decode them inside the jitted step (`decode`)."""
  codes: Any
  factor: Any = None

  def decoded(self) -> np.ndarray:
    """Float32 rows on the host: what `decode` computes on the devices, bit for bit."""
    return dequantize_factor(self.codes, self.factor)


def dequantize_factor(codes: np.ndarray, factor: np.ndarray | None) -> np.ndarray:
  codes = np.asarray(codes)
  if codes.dtype == DTYPES["float8_e4m3fn"]:
    x = np.take(_FLOAT8_TABLE, codes.view(np.uint8))
  else:
    x = codes.astype(np.float32)
  if factor is not None:
    x *= np.asarray(factor, np.float32)[..., None]
  return x


def decode(rows: Rows, input_scale: float = 1.0):
  """Float32 rows from `Rows` inside a jitted program, equal bit for bit to the host's
  `dequantize` followed by the reader's `normalize` (one product per factor, in that order:
  XLA does not reassociate float products)."""
  import jax.numpy as jnp
  x = rows.codes.astype(jnp.float32)
  if rows.factor is not None:
    x = x * rows.factor[..., None]
  if input_scale != 1.0:
    x = x * jnp.float32(input_scale)
  return x


class Batch(NamedTuple):
  """One batch of the stream, with what it had to leave out."""
  x: Any  # [batch_size, d_in] float32: numpy, or a jax.Array placed with the stream's sharding
  step: int
  skipped: int = 0  # rows holding NaN/Inf, each replaced by a finite row of this batch
  where: str = ""  # the first of them, e.g. "shard shard_00003.bin at row 17"; "" if none


def np_dtype(name: str) -> np.dtype:
  if name not in DTYPES:
    raise JaxsaeError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
  return DTYPES[name]


def row_scale(dtype: str) -> dict | None:
  """What the manifest records about an 8-bit dtype's per-row scales; None for float dtypes."""
  if dtype not in CODE_MAX:
    return None
  return {"dtype": "float32", "per": "row and site", "value": "max |x|",
          "code_of_max": CODE_MAX[dtype]}


def quantize(x: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
  """Rows [..., d_in] as stored in `dtype`: (codes, scales [...] float32, None unless 8-bit)."""
  dt = np_dtype(dtype)
  if dtype not in CODE_MAX:
    return np.asarray(x).astype(dt), None
  x = np.asarray(x, np.float32)
  s = np.abs(x).max(axis=-1)
  with np.errstate(invalid="ignore", divide="ignore"):  # non-finite rows: the writer refuses
    q = x * (CODE_MAX[dtype] / np.where(s > 0, s, 1))[..., None]
    if dtype == "int8":
      q = np.rint(q)
    return q.astype(dt), s.astype(SCALE_DTYPE)


def dequantize(codes: np.ndarray, scales: np.ndarray | None) -> np.ndarray:
  """Float32 rows of stored `codes` [..., d_in] and their `scales` [...] (None if unscaled).

  Every read of a store goes through here or `Rows.decoded` (the same arithmetic), so no
  reader on the host sees 8-bit codes.
  """
  codes = np.asarray(codes)
  if scales is None:
    return dequantize_factor(codes, None)
  return dequantize_factor(codes, np.asarray(scales, np.float32) /
                           np.float32(_CODE_MAX_OF[codes.dtype]))


def shard_name(index: int) -> str:
  return f"shard_{index:05d}"


def written_shards(directory: str) -> dict[int, dict]:
  """The ledger entries of the shards that are completely written, by index, in a local or a
  gs:// directory (there read 16 at a time: a request per ledger)."""
  from concurrent.futures import ThreadPoolExecutor
  paths = [files.join(directory, name) for name in files.listdir(directory)
           if name.startswith("shard_") and name.endswith(".json") and ".tmp-" not in name]
  with ThreadPoolExecutor(16 if files.is_remote(directory) else 1) as pool:
    entries = pool.map(lambda path: json.loads(files.read_bytes(path)), paths)
    return {entry["index"]: entry for entry in entries}


# ---------------------------------------------------------------------------------------------
# Massive activations: what the manifest's `outliers` (store_writer.outlier_stats) say of a site.

# A row whose norm is over this many times its site's median counts as massive: the sites
# study's cut (experiments/depth_study.MASSIVE). SmolLM2's residual stream at layers 12-20 has
# 0.4% of its rows over it, each window's first token, at 120-210x the median.
MASSIVE_OVER_MEDIAN = 5.0
# Massive rows dominate a site when they hold over this share of its centred variance, which is
# the weight an FVU loss gives them: an SAE is then fitted mostly to them along one direction and
# its seeds settle the rest differently. SmolLM2's residual stream (65K tokens of the default
# corpus, as extraction records it): 99% at layer 15 and 95% at 25, where seeds shared 0.09-0.32
# and 3.5-4.6x more without those rows (layers 12-20; experiments/README.md, the sites study
# and drop_massive_rows); 51% at layer 4, where they shared 0.29, near its MLP output's 0.39.
# The line is drawn between.
MASSIVE_VARIANCE_SHARE = 0.8
# A window position is a massive one when at least this share of the rows sampled there are:
# SmolLM2's position 0 is massive in every window, whatever token sits there.
MASSIVE_POSITION_SHARE = 0.5


def outliers_of(manifest: dict, site: str) -> dict | None:
  """The manifest's outlier figures of `site`, or None where it records none (a store written
  before they were measured, or a field too damaged to read: a warning is no reason to refuse
  a store)."""
  o = manifest.get("outliers")
  o = o.get(site) if isinstance(o, dict) else None
  number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
  if not isinstance(o, dict) or not all(
      number(o.get(k)) for k in ("massive_rows", "massive_variance", "top_dim_variance")) or \
      not all(o.get(k) is None or number(o[k]) for k in ("over_median", "max_norm_over_median")):
    return None
  return o


def massive_positions(o: dict) -> dict[int, tuple[float, float]]:
  """{window position: (share of the massive rows there, share of its rows that are massive)}
  of the positions an outlier record lists, most massive rows first; {} where it lists none."""
  try:
    return {int(p["position"]): (float(p["share"]), float(p["massive"]))
            for p in o.get("positions") or []}
  except (KeyError, TypeError, ValueError):
    return {}


def skip_first_for(o: dict, first: int) -> int:
  """The --skip_first that leaves out the run of massive positions starting at `first` (the
  store's own first stored position); `first` itself where that position is not massive."""
  at = massive_positions(o)
  n = first
  while n in at and at[n][1] >= MASSIVE_POSITION_SHARE:
    n += 1
  return n


def outlier_record(manifest: dict, site: str) -> dict | None:
  """`site`'s outlier figures with their one-line warning (None where there is none): what a
  match keeps of its store for the report, which renders from the match directory alone."""
  o = outliers_of(manifest, site)
  return None if o is None else {"site": site, **o, "warning": massive_warning(manifest, site)}


def massive_warning(manifest: dict, site: str) -> str | None:
  """One line for a site whose massive rows dominate its centred variance, naming their window
  positions and the --skip_first that leaves them out; None where they do not, or where the
  manifest measured nothing."""
  o = outliers_of(manifest, site)
  if o is None or not o["massive_variance"] > MASSIVE_VARIANCE_SHARE:
    return None
  over, peak = o.get("over_median", MASSIVE_OVER_MEDIAN), o.get("max_norm_over_median")
  head = (f"warning: {site}: {100 * o['massive_rows']:.2g}% of rows are over {over:g}x the "
          f"median norm{f' (up to {peak:.0f}x)' if peak else ''}")
  weight = (f"hold {100 * o['massive_variance']:.0f}% of the centred variance (top dimension "
            f"{100 * o['top_dim_variance']:.0f}%), which an SAE's FVU loss fits first")
  first = int(manifest.get("skip_first", 0))
  at, n = massive_positions(o), skip_first_for(o, first)
  if n > first:
    share = sum(at[p][0] for p in range(first, n))
    where = f"{first}" if n == first + 1 else f"{first}-{n - 1}"
    return (f"{head}, {100 * share:.0f}% of them at window position {where}, and {weight}: "
            f"re-extract with --skip_first={n} (experiments/README.md, sites study)")
  if at:
    listed = ", ".join(f"{p} ({100 * s:.0f}%)" for p, (s, _) in list(at.items())[:3])
    return (f"{head} and {weight}; they sit at window positions {listed}, not at a window's "
            "start, so --skip_first would not remove them (experiments/drop_massive_rows.py "
            "drops rows by norm)")
  return f"{head} and {weight}; the store records no window positions for them"


def _check_manifest(m: Any, where: str) -> None:
  """Raises JaxsaeError naming the first field of `m` that is missing or of the wrong kind."""
  def bad(what: str):
    raise JaxsaeError(f"{where}: {what}; the manifest is damaged or foreign: re-extract the "
                      "store")

  def count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0

  if not isinstance(m, dict):
    bad("not a JSON object")
  for key in ("format_version", "sites", "d_in", "dtype", "ctx_len", "num_tokens", "shards"):
    if key not in m:
      bad(f"lacks {key!r}")
  for key in ("format_version", "d_in", "ctx_len", "num_tokens"):
    if not count(m[key]) or (key != "num_tokens" and m[key] == 0):
      bad(f"{key}={m[key]!r} is not a positive integer")
  if not isinstance(m["sites"], list) or not m["sites"] or \
      not all(isinstance(x, str) for x in m["sites"]):
    bad(f"sites={m['sites']!r} is not a list of module paths")
  if not isinstance(m["dtype"], str) or m["dtype"] not in DTYPES:
    bad(f"dtype={m['dtype']!r} is not one of {', '.join(DTYPES)}")
  if m.get("row_scale") != row_scale(m["dtype"]):
    bad(f"row_scale={m.get('row_scale')!r} is not what a {m['dtype']} store records "
        f"({row_scale(m['dtype'])!r})")
  if not isinstance(m["shards"], list):
    bad("shards is not a list")

  def file_name(v) -> bool:
    return isinstance(v, str) and bool(v) and "/" not in v and "\\" not in v and \
        not v.startswith(".")

  for i, sh in enumerate(m["shards"]):
    if not isinstance(sh, dict):
      bad(f"shard entry {i} is not an object")
    f = sh.get("file")
    if not file_name(f):
      bad(f"shard entry {i} has file={f!r}, not a file name in the store")
    if not count(sh.get("num_tokens")):
      bad(f"shard {f} has num_tokens={sh.get('num_tokens')!r}")
    if not isinstance(sh.get("sha256"), str):
      bad(f"shard {f} has no sha256")
    if m["dtype"] in CODE_MAX and not (file_name(sh.get("scales_file")) and
                                       isinstance(sh.get("scales_sha256"), str)):
      bad(f"shard {f} of a {m['dtype']} store has no scales_file and scales_sha256")
  norms = m.get("mean_norm", {})
  if not isinstance(norms, dict) or not all(
      isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and np.isfinite(v)
      for v in norms.values()):
    bad(f"mean_norm={norms!r} is not a positive number per site")


class Store:
  """A finished activation store: validated on open, read with memory maps.

  Args:
    directory: local path or gs:// URL of the store.
    expect_d_in, expect_dtype: raise a clear error if the store differs (e.g. a resumed run).
    verify: "size" checks every shard's byte size on open; "sha256" also hashes every shard on
      open; shards are in any case hashed on first use by the batch stream when
      `verify_on_read` is on. A gs:// shard is checked as it arrives: its size before the
      read, its sha256 before any row of it is used.
    window: gs:// stores only: the most shards held in memory at once. A stream holds the
      buffer it reads and the buffers read ahead of it, `window // shuffle_shards` buffers in
      all (at least 2: a batch can straddle two); a local store is memory-mapped instead.
  """

  def __init__(self, directory: str, *, expect_d_in: int | None = None,
               expect_dtype: str | None = None, verify: str = "size",
               manifest: dict | None = None, window: int = 8):
    self.directory = str(directory)
    self.remote = files.is_remote(self.directory)
    self._window = _Window(self._fetch, window) if self.remote else None
    self.manifest = manifest if manifest is not None else self._read_manifest()
    m = self.manifest
    _check_manifest(m, self._where(MANIFEST))
    if m["format_version"] != FORMAT_VERSION:
      raise JaxsaeError(f"{self.directory} has store format {m['format_version']}, this jaxsae "
                        f"reads {FORMAT_VERSION}; re-extract it")
    if manifest is None:
      self._check_spec(m)
    self.sites: list[str] = list(m["sites"])
    self.d_in: int = int(m["d_in"])
    self.dtype: np.dtype = np_dtype(m["dtype"])  # as stored; reads are float (see `dequantize`)
    self.scaled: bool = m["dtype"] in CODE_MAX
    self.shards: list[dict] = list(m["shards"])
    if expect_d_in is not None and expect_d_in != self.d_in:
      raise JaxsaeError(f"store {self.directory} has d_in={self.d_in}, expected {expect_d_in}")
    if expect_dtype is not None and np_dtype(expect_dtype) != self.dtype:
      raise JaxsaeError(f"store {self.directory} holds {m['dtype']}, expected {expect_dtype}")
    names = [s["file"] for s in self.shards]
    if len(set(names)) != len(names):
      dup = next(f for f in names if names.count(f) > 1)
      raise JaxsaeError(f"{self._where(MANIFEST)} lists shard {dup} twice; re-extract the store")
    counts = np.array([s["num_tokens"] for s in self.shards], np.int64)
    if counts.sum() != m["num_tokens"]:
      raise JaxsaeError(f"{self._where(MANIFEST)}: shard token counts add up to {counts.sum()}, "
                        f"not num_tokens={m['num_tokens']}; re-extract the store")
    self.offsets = np.concatenate([[0], np.cumsum(counts)])
    self.num_tokens: int = int(m["num_tokens"])
    self._verified: set[int] = set()
    self._non_finite: dict[int, list[np.ndarray]] = {}  # shard -> per site, global rows
    self._shard_locks = [threading.Lock() for _ in self.shards]
    self._maps: dict[int, np.ndarray] = {}
    self._perm_cache: dict[tuple, np.ndarray] = {}
    self._lock = threading.Lock()
    for i, s in enumerate(self.shards):
      self._check_size(i, s)
      if verify == "sha256":
        self.verify_shard(i)

  def _where(self, name: str) -> str:
    return f"{self.directory.rstrip('/')}/{name}"

  def _read_manifest(self) -> dict:
    if not files.exists(self._where(MANIFEST)):
      if files.exists(self._where(SPEC)):
        spec = json.loads(files.read_bytes(self._where(SPEC)))
        n = len(written_shards(self.directory))
        raise JaxsaeError(
            f"store {self.directory} is incomplete ({n} of {spec.get('num_shards')} shards "
            "written); rerun the same `jaxsae extract` command to finish it")
      raise JaxsaeError(f"{self.directory} is not an activation store (no {MANIFEST}); "
                        "create one with `jaxsae extract --out=...`")
    try:
      return json.loads(files.read_bytes(self._where(MANIFEST)))
    except json.JSONDecodeError as e:
      raise JaxsaeError(f"{self._where(MANIFEST)} is not valid JSON ({e}); re-extract the store")

  def _check_spec(self, m: dict) -> None:
    """Refuses a manifest that is not this store's own (e.g. copied from another extraction).

    spec.json is written first and never rewritten, so it says what this directory's shards
    are; the manifest must repeat every field of it.
    """
    if not files.exists(self._where(SPEC)):
      return
    spec = json.loads(files.read_bytes(self._where(SPEC)))
    diff = sorted(k for k in spec if m.get(k) != spec[k])
    if diff:
      k = diff[0]
      raise JaxsaeError(
          f"{self._where(MANIFEST)} is not this store's manifest: its {k}={m.get(k)!r} differs "
          f"from {k}={spec[k]!r} in {SPEC} (and {len(diff) - 1} more field(s)); it was copied "
          "from another store: put back this store's own, or re-extract")

  def _files(self, s: dict) -> list[tuple[str, str, np.dtype, tuple[int, ...]]]:
    """(file, sha256 key, dtype, shape) of each file of shard entry `s`: codes, then scales."""
    out = [(s["file"], "sha256", self.dtype, (s["num_tokens"], len(self.sites), self.d_in))]
    if self.scaled:
      out.append((s["scales_file"], "scales_sha256", SCALE_DTYPE,
                  (s["num_tokens"], len(self.sites))))
    return out

  def _check_size(self, i: int, s: dict) -> None:
    if self.remote:  # one request per file would make opening a large store slow: `_fetch`
      return         # checks each shard's size as it reads it
    for name, _, dtype, shape in self._files(s):
      path = os.path.join(self.directory, name)
      self._check_file_size(s, name, os.path.getsize(path) if os.path.exists(path) else None,
                            dtype, shape)

  def _check_file_size(self, s: dict, name: str, size: int | None, dtype: np.dtype,
                       shape: tuple[int, ...]) -> int:
    """The bytes file `name` of shard entry `s` must have; raises if `size` (None: the file is
    missing) is not that."""
    want = int(np.prod(shape)) * dtype.itemsize
    if size is None:
      raise JaxsaeError(f"shard {self._where(name) if self.remote else name} listed in "
                        f"{self._where(MANIFEST)} is missing; rerun `jaxsae extract` with the "
                        "same flags to rewrite it")
    if size != want:
      raise JaxsaeError(f"shard {self._where(name)} has {size} bytes, the manifest says "
                        f"{want} ({s['num_tokens']} rows); it is truncated or foreign: delete "
                        f"it and {s['file'][:-4]}.json and rerun `jaxsae extract`")
    return want

  def verify_shard(self, i: int) -> None:
    """Hashes shard `i`'s files (once) and raises if one differs from the manifest."""
    if i in self._verified:
      return
    if self.remote:  # a shard read from gs:// is hashed as it arrives, every time it does
      self._window.get(i)
      return
    s = self.shards[i]
    for name, key, _, _ in self._files(s):
      if files.sha256_file(files.as_path(self.directory) / name) != s[key]:
        raise JaxsaeError(f"shard {self._where(name)} fails its checksum (corrupted on disk); "
                          f"delete it and {s['file'][:-4]}.json and rerun `jaxsae extract` to "
                          "rewrite it")
    self._verified.add(i)

  def stored(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Shard `i` as stored: codes [rows, n_sites, d_in] and scales [rows, n_sites] (None
    unless 8-bit), memory-mapped where the path is local. Read rows with `rows` or `shard`."""
    if self.remote:
      return self._window.get(i)
    with self._lock:
      if i not in self._maps:
        arrays = [np.memmap(os.path.join(self.directory, name), dtype, "r", shape=shape)
                  for name, _, dtype, shape in self._files(self.shards[i])]
        self._maps[i] = (arrays[0], arrays[1] if self.scaled else None)
      return self._maps[i]

  def _fetch(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Shard `i` of a gs:// store read whole into memory: its size checked first, its bytes
    read in concurrent ranged chunks, its sha256 checked before any row of it is used."""
    s = self.shards[i]
    arrays = []
    for name, key, dtype, shape in self._files(s):
      url = self._where(name)
      want = self._check_file_size(s, name, gcs.size(url), dtype, shape)
      buf = _aligned_empty((want,), np.dtype(np.uint8))
      chunks = [(a, min(a + READ_CHUNK, want)) for a in range(0, want, READ_CHUNK)]

      def read(span, url=url, buf=buf):
        buf[span[0]:span[1]] = np.frombuffer(gcs.read_range(url, *span), np.uint8)

      list(_read_pool().map(read, chunks))
      if hashlib.sha256(buf).hexdigest() != s[key]:
        raise JaxsaeError(f"shard {url} fails its checksum (its bytes changed on the server or "
                          f"on the way); delete it and {s['file'][:-4]}.json and rerun "
                          "`jaxsae extract` to rewrite it")
      arrays.append(buf.view(dtype).reshape(shape))
    return arrays[0], arrays[1] if self.scaled else None

  def shard(self, i: int) -> np.ndarray:
    """Shard `i` as rows [rows, n_sites, d_in]: the memory map itself for float dtypes (no
    copy), dequantized to float32 for 8-bit ones."""
    codes, scales = self.stored(i)
    return codes if scales is None else dequantize(codes, scales)

  def prepare(self, i: int, verify: bool = True) -> None:
    """Makes shard `i` ready to read, once: its checksums (with `verify`) and the rows of each
    site holding NaN/Inf, found from the stored bits in one pass over the shard. The stream
    prepares the shards ahead of the batches that need them (`batches`), so neither waits in
    the step's path; a batch then checks finiteness by row index alone."""
    with self._shard_locks[i]:
      if verify:
        self.verify_shard(i)
      if i not in self._non_finite:
        codes, scales = self.stored(i)
        bad = np.zeros(codes.shape[:2], bool)
        for lo in range(0, len(codes), _SCAN_ROWS):
          bad[lo:lo + _SCAN_ROWS] = _non_finite_rows(codes[lo:lo + _SCAN_ROWS])
        if scales is not None:
          bad |= ~np.isfinite(scales)
        self._non_finite[i] = [np.nonzero(bad[:, j])[0] + self.offsets[i]
                               for j in range(bad.shape[1])]

  def _all_prepared(self, verify: bool) -> bool:
    return len(self._non_finite) == len(self.shards) and (
        not verify or len(self._verified) == len(self.shards))

  def gather(self, indices: np.ndarray, site: str | None = None) -> "Rows":
    """Rows at global `indices` (any order) for one site, as stored: codes [n, d_in] in the
    store's dtype and, for 8-bit stores, each row's factor scale / code_of_max [n] float32, to
    be decoded on the devices (`decode`) or on the host (`Rows.decoded`)."""
    indices = np.asarray(indices, np.int64)
    return self._gather(indices, self._shards_of(indices), self.site_index(site))

  def _shards_of(self, indices: np.ndarray) -> np.ndarray:
    return np.searchsorted(self.offsets, indices, side="right") - 1

  def _gather(self, indices: np.ndarray, shard_of: np.ndarray, j: int) -> "Rows":
    codes = _aligned_empty((len(indices), self.d_in), self.dtype)
    scales = _aligned_empty((len(indices),), SCALE_DTYPE) if self.scaled else None
    touched = _touched(shard_of, len(self.shards))
    stored = {i: self.stored(i) for i in touched}
    native = _native_gather()
    if native is not None and touched:
      # One copy per row, in batch order, outside the GIL (cpu_kernels.cc, JaxsaeGatherRows).
      local = indices - self.offsets[shard_of]
      for out, part in ((codes, 0), (scales, 1)):
        if out is None:
          continue
        bases = (ctypes.c_void_p * len(self.shards))()  # untouched shards: never read
        for i, arrays in stored.items():
          bases[i] = arrays[part].ctypes.data + j * arrays[part].strides[1]
        native(bases, shard_of.ctypes.data, local.ctypes.data, len(indices), out.strides[0],
               stored[touched[0]][part].strides[0], out.ctypes.data)
    else:
      raw = codes.view(_RAW[self.dtype.itemsize])
      for i in touched:
        sel = shard_of == i
        local = indices[sel] - self.offsets[i]
        c, s = stored[i]
        # Whole rows copied as integers of the row's width (ml_dtypes' element types would go
        # through their own casts); mode="clip" spares np.take a buffered copy of its output.
        raw[sel] = np.take(c[:, j].view(_RAW[self.dtype.itemsize]), local, axis=0, mode="clip")
        if scales is not None:
          scales[sel] = s[local, j]
    if scales is None:
      return Rows(codes)
    return Rows(codes, scales / np.float32(_CODE_MAX_OF[self.dtype]))

  def site_index(self, site: str | None) -> int:
    if site is None:
      return 0
    if site not in self.sites:
      raise JaxsaeError(f"site {site!r} is not in store {self.directory}; it has {self.sites}")
    return self.sites.index(site)

  def rows(self, indices: np.ndarray, site: str | None = None,
           dtype: np.dtype = np.float32) -> np.ndarray:
    """Rows at global `indices` (any order) for one site, as float [len(indices), d_in]."""
    return self.gather(indices, site).decoded().astype(dtype, copy=False)

  def tokens(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Shard `i`'s window token ids [windows, ctx_len] and row positions [rows]."""
    s = self.shards[i]
    with np.load(io.BytesIO(files.read_bytes(self._where(s["tokens_file"])))) as z:
      return z["ids"], z["pos"]

  def context(self, row: int, before: int = 16, after: int = 4) -> tuple[list[int], int]:
    """Token ids around global `row` within its window, and the index of the row's own token."""
    i = int(np.searchsorted(self.offsets, row, side="right") - 1)
    ids, pos = self.tokens(i)
    flat = int(pos[row - self.offsets[i]])
    w, p = divmod(flat, ids.shape[1])
    lo = max(0, p - before)
    return ids[w, lo:p + after + 1].tolist(), p - lo

  def normalizer(self, site: str | None = None) -> float:
    """The factor that scales this site's activations to mean norm sqrt(d_in)."""
    site = self.sites[self.site_index(site)]
    norm = self.manifest.get("mean_norm", {}).get(site)
    if norm is None:
      raise JaxsaeError(f"{self._where(MANIFEST)} records no mean norm for {site}; re-extract "
                        "the store, or train without normalisation")
    return float(np.sqrt(self.d_in) / norm)

  def outliers(self, site: str | None = None) -> dict | None:
    """The manifest's outlier figures of `site` (store_writer.outlier_stats), None if absent."""
    return outliers_of(self.manifest, self.sites[self.site_index(site)])

  def massive_warning(self, site: str | None = None) -> str | None:
    """`massive_warning`'s one line for `site`, or None."""
    return massive_warning(self.manifest, self.sites[self.site_index(site)])

  def outlier_record(self, site: str | None = None) -> dict | None:
    """`outlier_record` of `site`: its figures and warning, for a match to keep."""
    return outlier_record(self.manifest, self.sites[self.site_index(site)])

  # -------------------------------------------------------------------------------------------
  # The deterministic batch stream.

  def _buffers(self, data_seed: int, epoch: int, shuffle_shards: int) -> list[np.ndarray]:
    order = np.random.default_rng([data_seed, epoch]).permutation(len(self.shards))
    return [order[k:k + shuffle_shards] for k in range(0, len(order), shuffle_shards)]

  def batch_indices(self, step: int, batch_size: int, data_seed: int = 0,
                    shuffle_shards: int = 4) -> np.ndarray:
    """Global row indices of batch `step`: a pure function of its arguments."""
    out = []
    g, end = step * batch_size, (step + 1) * batch_size
    while g < end:
      epoch, r = divmod(g, self.num_tokens)
      take = min(end - g, self.num_tokens - r)
      out.append(self._epoch_rows(data_seed, epoch, shuffle_shards, r, r + take))
      g += take
    return np.concatenate(out)

  def _epoch_rows(self, data_seed: int, epoch: int, shuffle_shards: int, lo: int,
                  hi: int) -> np.ndarray:
    out, start = [], 0
    for b, shards in enumerate(self._buffers(data_seed, epoch, shuffle_shards)):
      n = int(sum(self.shards[i]["num_tokens"] for i in shards))
      if start + n > lo and start < hi:
        perm = self._buffer_perm(data_seed, epoch, b, tuple(int(i) for i in shards))
        out.append(perm[max(lo - start, 0):min(hi - start, n)])
      start += n
    return np.concatenate(out)

  def _buffer_perm(self, data_seed, epoch, b, shards) -> np.ndarray:
    key = (data_seed, epoch, b, shards)
    with self._lock:
      if key in self._perm_cache:
        return self._perm_cache[key]
    rows = np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in shards])
    perm = rows[np.random.default_rng([data_seed, epoch, b]).permutation(len(rows))]
    with self._lock:
      # A few buffers: a forward-moving stream needs one, or two where the batches that
      # workers read at once straddle a buffer's end.
      while len(self._perm_cache) >= 4:
        self._perm_cache.pop(next(iter(self._perm_cache)))
      self._perm_cache[key] = perm
    return perm

  def shard_order(self, start_step: int, batch_size: int, data_seed: int = 0,
                  shuffle_shards: int = 4) -> Iterator[int]:
    """The shards in the order the stream from `start_step` first reads them, epoch after
    epoch: each buffer's shards, sorted (a batch reads all of its buffer's shards at once)."""
    for shards, _, _ in self.buffer_schedule(start_step, batch_size, data_seed, shuffle_shards):
      yield from sorted(shards)

  def batch(self, step: int, batch_size: int, **kwargs) -> np.ndarray:
    """Rows [lo, hi) of batch `step` as float32 [hi - lo, d_in]; see `read_batch`."""
    return self.read_batch(step, batch_size, **kwargs).x

  def read_batch(self, step: int, batch_size: int, *, data_seed: int = 0,
                 site: str | None = None, shuffle_shards: int = 4, normalize: bool = False,
                 process_index: int = 0, process_count: int = 1,
                 rows: tuple[int, int] | None = None, verify_on_read: bool = True,
                 skip_non_finite: bool = False, stored: bool = False) -> Batch:
    """Rows [lo, hi) of batch `step` as float32 [hi - lo, d_in], with what was skipped.

    `rows` defaults to this process's equal share, [batch_size // process_count] rows.
    A row holding NaN/Inf is an error naming its shard and row, or with `skip_non_finite`
    skipped: its place goes to a finite row of the same batch, and the Batch counts it.
    With `stored`, x is the rows as stored (`Rows`), left for the devices to decode and, with
    `normalize`, to scale (`decode(x, store.normalizer(site))`).
    """
    if rows is None:
      if batch_size % process_count:
        raise JaxsaeError(f"batch size {batch_size} does not split over {process_count} hosts")
      per = batch_size // process_count
      rows = (process_index * per, (process_index + 1) * per)
    idx = self.batch_indices(step, batch_size, data_seed, shuffle_shards)[rows[0]:rows[1]]
    shard_of = self._shards_of(idx)
    touched = _touched(shard_of, len(self.shards))
    for i in touched:
      self.prepare(i, verify_on_read)
    j = self.site_index(site)
    x = self._gather(idx, shard_of, j)
    known = [self._non_finite[i][j] for i in touched]
    skipped, where = 0, ""
    bad = np.isin(idx, np.concatenate(known)) if any(len(k) for k in known) else None
    if bad is not None and bad.any():
      r = int(idx[np.argmax(bad)])
      i = int(np.searchsorted(self.offsets, r, side="right") - 1)
      where = f"shard {self.shards[i]['file']} at row {r - self.offsets[i]}"
      if not skip_non_finite or bad.all():
        raise JaxsaeError(f"non-finite activation in {where}; re-extract that shard, or train "
                          "with --skip_non_finite to skip such rows")
      # Replaced by finite rows of this same batch, not by rows read further on: the batch
      # keeps its shape and stays a pure function of (data_seed, step), so resuming is exact.
      good = np.nonzero(~bad)[0]
      take = good[np.arange(int(bad.sum())) % len(good)]
      for a in x:
        if a is not None:
          a[bad] = a[take]
      skipped = int(bad.sum())
    if stored:
      return Batch(x, step, skipped, where)
    x = x.decoded()
    if normalize:
      x *= self.normalizer(site)
    return Batch(x, step, skipped, where)

  def batches(self, batch_size: int, *, start_step: int = 0, num_steps: int | None = None,
              sharding: Any = None, prefetch: int | None = None, workers: int | None = None,
              **kwargs) -> Iterator[Batch]:
    """Yields a Batch per step from `start_step` on, each read up to `prefetch` steps ahead
    (default: 2 per worker) by a pool of `workers` threads (default: one per core, at most 8)
    and placed on the devices there; 0 reads each batch when it is asked for.

    The shards are prepared (checksums, non-finite rows) on a thread of their own in the order
    the stream will read them, so a step waits on that only where the stream starts.

    With a `jax.sharding.Sharding` (for x [B, d_in]), each batch's x is placed on devices as a
    global array (with `stored=True`, a `Rows` of such arrays: factors [B] take the sharding
    of its first axis). On several hosts each reads only the rows its own devices hold: its
    share of the data axis, or the whole batch where the mesh puts seeds across hosts;
    `skipped` then counts the non-finite rows among those.
    """
    import jax
    shape = (batch_size, self.d_in)
    if sharding is not None and jax.process_count() > 1:
      lo, hi = addressable_rows(sharding, shape)

      def make(step):
        b = self.read_batch(step, batch_size, rows=(lo, hi), **kwargs)
        return b._replace(x=_place(b.x, sharding, lambda a, s: jax.make_array_from_callback(
            (batch_size,) + a.shape[1:], s,
            lambda index: a[_rows_of(index[0], batch_size, -lo)])))
    else:
      def make(step):
        b = self.read_batch(step, batch_size, **kwargs)
        return b if sharding is None else b._replace(x=_place(b.x, sharding))

    verify = kwargs.get("verify_on_read", True)
    data_seed, shuffle = kwargs.get("data_seed", 0), kwargs.get("shuffle_shards", 4)
    workers = workers or _default_workers()
    prefetch = 2 * workers if prefetch is None else prefetch
    if self.remote:
      return self._streamed(make, start_step, num_steps, batch_size, data_seed, shuffle,
                            prefetch, workers)
    order = self.shard_order(start_step, batch_size, data_seed, shuffle)

    def prepare_ahead(stop: threading.Event) -> None:
      try:
        for i in order:
          if stop.is_set() or self._all_prepared(verify):  # local shards stay prepared
            return
          self.prepare(i, verify)
      except Exception:  # pylint: disable=broad-except
        return  # the batch that needs the shard meets the same error and surfaces it

    return _prefetched(make, start_step, num_steps, prefetch, workers, prepare_ahead)

  def buffer_schedule(self, start_step: int, batch_size: int, data_seed: int = 0,
                      shuffle_shards: int = 4) -> Iterator[tuple[tuple[int, ...], int, int]]:
    """(shards, first step, last step) of each buffer the stream from `start_step` reads, in
    order, epoch after epoch."""
    epoch = start_step * batch_size // self.num_tokens
    while True:
      start = epoch * self.num_tokens
      for shards in self._buffers(data_seed, epoch, shuffle_shards):
        n = int(sum(self.shards[i]["num_tokens"] for i in shards))
        first, last = start // batch_size, (start + n - 1) // batch_size
        if last >= start_step:
          yield tuple(int(i) for i in shards), first, last
        start += n
      epoch += 1

  def _streamed(self, make, start: int, num: int | None, batch_size: int, data_seed: int,
                shuffle_shards: int, prefetch: int, workers: int) -> Iterator[Batch]:
    """The stream of a gs:// store: a thread reads whole buffers ahead into the window and
    pins them there until every step that reads them is made, so memory holds the window's
    shards (and the batches in flight) however large the store."""
    window = self._window
    ahead = window.capacity // shuffle_shards
    if ahead < 2:
      raise JaxsaeError(
          f"a window of {window.capacity} shards holds fewer than two buffers of "
          f"{shuffle_shards} shards, and a batch can straddle two; raise --store_window to at "
          f"least {2 * shuffle_shards}")
    end = None if num is None else start + num
    cond = threading.Condition()
    made: set[int] = set()
    mark = [start]  # every step before it is made

    def made_step(step):
      b = make(step)
      with cond:
        made.add(step)
        while mark[0] in made:
          made.discard(mark[0])
          mark[0] += 1
        cond.notify_all()
      return b

    def read_ahead(stop: threading.Event) -> None:
      live: collections.deque = collections.deque()  # (shards, last step), oldest first
      try:
        for shards, first, last in self.buffer_schedule(start, batch_size, data_seed,
                                                        shuffle_shards):
          if end is not None and first >= end:
            return
          with cond:
            while True:
              while live and mark[0] > live[0][1]:
                window.unpin(live.popleft()[0])
              if len(live) < ahead or stop.is_set():
                break
              cond.wait(0.1)
          if stop.is_set():
            return
          window.pin(shards)
          live.append((shards, last))
          for i in shards:
            self.prepare(i)
      except Exception:  # pylint: disable=broad-except
        return  # the batch that needs the shard meets the same error and surfaces it
      finally:
        for shards, _ in live:
          window.unpin(shards)

    return _prefetched(made_step, start, num, prefetch, workers, read_ahead)


# gs:// shards are read in ranged chunks of this size, this many at once (over all streams).
READ_CHUNK = 8 << 20
READ_CONCURRENCY = 8
_pool: list = []
_pool_lock = threading.Lock()


def _read_pool():
  from concurrent.futures import ThreadPoolExecutor
  with _pool_lock:
    if not _pool:
      _pool.append(ThreadPoolExecutor(READ_CONCURRENCY, thread_name_prefix="jaxsae-gcs"))
    return _pool[0]


class _Window:
  """A gs:// store's shards in memory: at most `capacity` of them, each read whole and
  verified by `fetch` before it enters. A stream pins the buffers it reads and reads ahead
  (`Store.batches`); other reads (match's, `rows`) take what is there or fetch it, evicting the
  least recently used shard that no stream has pinned."""

  def __init__(self, fetch, capacity: int):
    if capacity < 1:
      raise JaxsaeError(f"a store window of {capacity} shards holds nothing; use at least 1")
    self.fetch, self.capacity = fetch, capacity
    self.held: collections.OrderedDict = collections.OrderedDict()
    self.pins: collections.Counter = collections.Counter()
    self.loading: set[int] = set()
    self.cond = threading.Condition()

  def get(self, i: int):
    with self.cond:
      while i in self.loading:  # another thread is reading it: take its copy
        self.cond.wait()
      if i in self.held:
        self.held.move_to_end(i)
        return self.held[i]
      self.loading.add(i)
      self._evict()
    try:
      arrays = self.fetch(i)
    except BaseException:
      with self.cond:
        self.loading.discard(i)
        self.cond.notify_all()
      raise
    with self.cond:
      self.loading.discard(i)
      self.held[i] = arrays
      self.cond.notify_all()
    return arrays

  def _evict(self) -> None:
    for j in list(self.held):
      if len(self.held) + len(self.loading) <= self.capacity:
        return
      if not self.pins[j]:
        del self.held[j]

  def pin(self, shards) -> None:
    with self.cond:
      self.pins.update(shards)

  def unpin(self, shards) -> None:
    with self.cond:
      self.pins.subtract(shards)
      self.pins += collections.Counter()  # drops the zeros
      self._evict()

  def bytes_held(self) -> int:
    with self.cond:
      return sum(a.nbytes for arrays in self.held.values() for a in arrays if a is not None)


def _touched(shard_of: np.ndarray, num_shards: int) -> list[int]:
  """The shards among `shard_of`, in order (a count, not a sort: a batch is 16K+ rows)."""
  return np.flatnonzero(np.bincount(shard_of, minlength=num_shards)).tolist()


def _native_gather():
  """The C++ row gather, or None (no compiler, or JAXSAE_CPU_KERNELS=0): numpy's then."""
  from jaxsae import cpu_kernels  # imported late: it brings jax, and builds on first use
  return cpu_kernels.gather_rows()


def _default_workers() -> int:
  # A gather is a copy at memory speed: past a few threads per socket more of them only contend
  # for its bandwidth, and each holds a batch in flight.
  return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                    else os.cpu_count() or 1))


def _place(x: Any, sharding: Any, callback=None) -> Any:
  """x (an array, or `Rows` of them) on the devices of `sharding`, which is for the codes; a
  Rows' factors drop its last axis. With `callback(array, global shape)`, a global array made
  from this host's part (several hosts)."""
  import jax

  def one(a, s):
    if a is None:
      return None
    return jax.device_put(a, s) if callback is None else callback(a, s)

  if not isinstance(x, Rows):
    return one(x, sharding)
  s = rows_sharding(sharding, x.factor is not None)
  if callback is None:  # one call for both: jax's per-call overhead is the reader's own cost
    return jax.device_put(x, s)
  return Rows(one(x.codes, s.codes), one(x.factor, s.factor))


def rows_sharding(sharding: Any, scaled: bool) -> Rows:
  """The shardings of a `Rows` whose codes take `sharding` (a NamedSharding of x [B, d_in] or
  [S, B, d_in]): its factors, one per row, drop the last axis."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  if not scaled:
    return Rows(sharding)
  return Rows(sharding, NamedSharding(sharding.mesh, P(*tuple(sharding.spec)[:-1])))


def _rows_of(index: slice, n: int, shift: int = 0) -> slice:
  start, stop, _ = index.indices(n)
  return slice(start + shift, stop + shift)


def addressable_rows(sharding: Any, shape: tuple[int, ...], axis: int = 0) -> tuple[int, int]:
  """The smallest range [lo, hi) along `axis` of a global batch that covers this process's
  devices (rows of x [B, d_in]; members or rows of per-seed data x [S, B, d_in])."""
  spans = [_rows_of(i[axis], shape[axis]) for i in
           sharding.addressable_devices_indices_map(shape).values()]
  return min(s.start for s in spans), max(s.stop for s in spans)


def member_batches(directory: str, data_seeds, batch_size: int, sharding: Any, *,
                   start_step: int, num_steps: int, window: int = 8,
                   **kwargs) -> Iterator[Batch]:
  """Per-seed data: each step's x [S, B, d_in] stacks member i's batch of data_seeds[i], the
  very batch a lone run with --data_seed=data_seeds[i] reads at that step (with `stored`, a
  `Rows` of codes [S, B, d_in] and factors [S, B]).

  Each host reads only the members and rows its own devices hold. Every member's stream has
  its own Store (and prefetch threads): a Store caches a few buffers' row orders, which
  streams of different data seeds would take from each other.
  """
  import jax
  shape = (len(data_seeds), batch_size, Store(directory).d_in)
  (m0, m1), (lo, hi) = addressable_rows(sharding, shape, 0), addressable_rows(sharding, shape, 1)
  streams = [Store(directory, window=window).batches(
      batch_size, start_step=start_step, num_steps=num_steps, data_seed=d, rows=(lo, hi),
      **kwargs)
             for d in data_seeds[m0:m1]]

  def local(index):
    return _rows_of(index[0], shape[0], -m0), _rows_of(index[1], batch_size, -lo)

  def stack(parts):
    return None if parts[0] is None else np.stack(parts)

  def place(a, s):
    return jax.make_array_from_callback((shape[0], batch_size) + a.shape[2:], s,
                                        lambda i: a[local(i)])

  for parts in zip(*streams):
    xs = [b.x for b in parts]
    x = Rows(*(stack(p) for p in zip(*xs))) if isinstance(xs[0], Rows) else np.stack(xs)
    yield Batch(_place(x, sharding, place), parts[0].step, sum(b.skipped for b in parts),
                next((b.where for b in parts if b.where), ""))


def _prefetched(make, start: int, num: int | None, depth: int, workers: int = 1,
                background=None) -> Iterator[Any]:
  """Yields make(start), make(start+1), ... in order, each made up to `depth` steps ahead on
  a pool of `workers` threads; `background(stop_event)`, if given, runs on a thread of its
  own meanwhile (the shards' preparation)."""
  end = None if num is None else start + num
  stop = threading.Event()
  if background is not None:
    threading.Thread(target=background, args=(stop,), daemon=True).start()
  if depth <= 0:
    try:
      step = start
      while end is None or step < end:
        yield make(step)
        step += 1
    finally:
      stop.set()
    return
  from concurrent.futures import ThreadPoolExecutor
  pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="jaxsae-read")
  pending: collections.deque = collections.deque()
  step = start
  try:
    while True:
      while len(pending) < depth and (end is None or step < end):
        pending.append(pool.submit(make, step))
        step += 1
      if not pending:
        return
      yield pending.popleft().result()  # a reader's error surfaces here, in the consumer
  finally:
    stop.set()
    for f in pending:
      f.cancel()
    pool.shutdown(wait=False)
