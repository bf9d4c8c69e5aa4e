"""Writing an activation store: shards, their ledger entries, worker claims, the manifest.

The layout and the format are store.py's; this module only ever adds files to a directory.
Every file appears under its final name only once complete (files.atomic_write_*), and a shard
counts as written only when its ledger entry exists. Independent workers can therefore fill
disjoint shard ranges of one store (overlapping ones are refused by the claims), and a killed
extraction resumes at the first shard without a ledger entry. Whoever writes the last shard
writes the manifest.

`directory` may be gs://BUCKET/PATH: every file is then one object uploaded whole (GCS shows
an object complete or not at all, so no temporary names are needed), and a claim is a
create-only upload, of which one worker wins on any host. What a claim cannot tell across
hosts is whether its worker still runs: a claim of another host is taken over only by a rerun
of its exact --shard_range, locally and on gs:// alike (see `_claim_is_stale`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import io
import json
import os
import shutil
import socket
import time
from typing import Callable, Iterator, Sequence

import numpy as np

from jaxsae import files
from jaxsae import gcs
from jaxsae import store
from jaxsae.errors import JaxsaeError

# Rows used to estimate the mean activation norm and the outliers recorded in the manifest.
NORM_SAMPLE_ROWS = 65536
# The sampled rows' window positions are read from at most this many shards' token files,
# spread over the store: enough to say where massive rows sit, without fetching every token
# file of a large gs:// store.
POSITION_SHARDS = 64
# Rows centred at a time (in float64) while measuring outliers: the temporaries stay small.
_CENTRE_ROWS = 4096
# Concurrent requests where a gs:// store is read object by object (ledgers, sampled rows).
_GCS_THREADS = 16
# Sampled rows of a gs:// shard this close together are read as one range: a request costs
# about as much as this many bytes.
_GCS_GAP_BYTES = 1 << 18


def _read_json(path: str):
  return json.loads(files.read_bytes(path))


written_shards = store.written_shards  # the writer resumes from what the reader counts


def init_store(directory: str, spec: dict) -> None:
  """Creates `directory` for `spec`, or checks that the store already there is the same one.

  `spec` must hold at least sites, d_in, dtype, ctx_len and num_shards; everything in it is part
  of the store's identity, so a rerun with other settings is refused instead of mixing data.
  """
  files.makedirs(directory)
  spec = {"format_version": store.FORMAT_VERSION, **spec}
  if store.row_scale(spec["dtype"]) is not None:  # float stores keep their spec as it was
    spec["row_scale"] = store.row_scale(spec["dtype"])
  path = files.join(directory, store.SPEC)
  if files.exists(path):
    old = _read_json(path)
    details = _spec_differences(old, spec, "now")
    if details:
      raise JaxsaeError(
          f"{directory} holds a different store ({details}); "
          "choose a new --out or delete that directory")
    return
  if files.listdir(directory):
    raise JaxsaeError(f"{directory} is not empty and is not an activation store; "
                      "choose a new --out")
  files.atomic_write_json(path, spec)


def _spec_differences(there: dict, ours: dict, ours_word: str, skip: Sequence[str] = ()) -> str:
  """The first four keys outside `skip` where two specs differ, with both values; '' if none."""
  diff = sorted(k for k in set(there) | set(ours) if k not in skip and there.get(k) != ours.get(k))
  return "; ".join(f"{k}: {there.get(k)!r} there, {ours.get(k)!r} {ours_word}" for k in diff[:4])


def write_shard(directory: str, index: int, acts: np.ndarray, ids: np.ndarray,
                pos: np.ndarray) -> dict:
  """Writes shard `index`: activations [rows, n_sites, d_in], window ids and row positions.

  `acts` are float rows (float32 from the model is best: an 8-bit store scales each row from
  them); they are stored in the dtype of the store's spec, which no shard can differ from.
  """
  if acts.ndim != 3 or pos.shape != (acts.shape[0],):
    raise ValueError(f"bad shard shapes: acts {acts.shape}, pos {pos.shape}")
  dtype = _read_json(files.join(directory, store.SPEC))["dtype"]
  codes, scales = store.quantize(acts, dtype)
  # Checked as read back, so that a float16 overflow or a NaN row scale is caught too.
  with np.errstate(invalid="ignore"):  # 0 * an infinite scale: NaN, which is the point
    finite = np.isfinite(store.dequantize(codes, scales)).all(axis=(1, 2))
  if not finite.all():
    bad = int(np.argmin(finite))
    raise JaxsaeError(
        f"non-finite activations in shard {index} at row {bad} (token id "
        f"{int(ids.reshape(-1)[pos[bad]])}); the model produced NaN/Inf: try --dtype=float32 or "
        "a model dtype with more range")
  name = store.shard_name(index)
  base = files.join(directory, name)
  acts_bytes = np.ascontiguousarray(codes).tobytes()
  buf = _npz_bytes(ids=ids.astype(np.int32), pos=pos.astype(np.int32))
  files.atomic_write_bytes(base + ".bin", acts_bytes)
  files.atomic_write_bytes(base + ".tokens.npz", buf)
  scale_entry = {}
  if scales is not None:
    scale_bytes = np.ascontiguousarray(scales).tobytes()
    files.atomic_write_bytes(base + ".scales.bin", scale_bytes)
    scale_entry = {"scales_file": name + ".scales.bin",
                   "scales_sha256": hashlib.sha256(scale_bytes).hexdigest()}
  entry = {
      "index": index,
      "file": name + ".bin",
      "num_tokens": int(acts.shape[0]),
      "num_windows": int(ids.shape[0]),
      "sha256": hashlib.sha256(acts_bytes).hexdigest(),
      "tokens_file": name + ".tokens.npz",
      "tokens_sha256": hashlib.sha256(buf).hexdigest(),
      **scale_entry,
  }
  files.atomic_write_json(base + ".json", entry)  # last: the shard now counts as written
  return entry


def _npz_bytes(**arrays) -> bytes:
  out = io.BytesIO()
  np.savez(out, **arrays)
  return out.getvalue()


def _claim_path(directory: str, index: int) -> str:
  return files.join(directory, store.shard_name(index) + ".claim")


def _read_claim(path: str) -> dict | None:
  try:
    return _read_json(path)
  except FileNotFoundError:
    return None
  except (OSError, json.JSONDecodeError):
    return {}  # unreadable: treated as another worker's, so never taken silently


def _claim_is_stale(claim: dict, owner: dict) -> bool:
  """Whether `owner` may take `claim` over: its worker is gone, or it is being rerun.

  A worker on this host is gone when its pid is; on another host only a rerun of the very
  same range (a restarted worker) may take over, as that host's processes cannot be seen.
  The same holds for a gs:// store, whose workers are on many hosts: a claim records no
  heartbeat, so a worker gone for good on another host leaves its claims to a rerun of its
  range, or to a person who deletes them.
  """
  if claim.get("host") == owner["host"]:
    try:
      os.kill(int(claim["pid"]), 0)
    except ProcessLookupError:
      return True
    except (KeyError, TypeError, ValueError, OSError):
      return False
    return False  # alive here, whatever its range: two writers of one shard race
  return bool(claim) and claim.get("range") == owner["range"]


def claim_shards(directory: str, indices: Sequence[int], shard_range: str) -> None:
  """Claims shards `indices` for this process, or raises naming the worker that holds one.

  A claim is a file shard_NNNNN.claim created atomically and only if absent (`_creating`), so
  two workers given overlapping `--shard_range`s cannot both hold a shard; the second is
  refused before it writes anything.
  """
  owner = {"pid": os.getpid(), "host": socket.gethostname(), "range": shard_range,
           "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
  sweep_claims(directory)
  taken = []
  with _creating(directory, owner) as create:
    for i in indices:
      path = _claim_path(directory, i)
      while not create(path):
        claim = _read_claim(path)
        if claim is None:
          continue  # released between our two looks: try again
        if not _claim_is_stale(claim, owner):
          release_shards(directory, taken)
          raise JaxsaeError(
              f"{path}: shard {i} is claimed by another extraction worker (pid "
              f"{claim.get('pid')} on {claim.get('host')}, --shard_range="
              f"{claim.get('range') or 'all'}) that overlaps --shard_range="
              f"{shard_range or 'all'}; give workers disjoint ranges, or if that worker is "
              "gone for good, delete its .claim files (or rerun its exact range)")
        files.atomic_write_json(path, owner)
        break
      taken.append(i)


@contextlib.contextmanager
def _creating(directory: str, owner: dict) -> Iterator[Callable[[str], bool]]:
  """create(path) -> bool: writes `owner` as the file `path` only if no file has that name.

  Locally a complete temporary file is hard-linked under the name, which fails if the name
  exists; on gs:// the upload is create-only (ifGenerationMatch=0). Of several workers
  creating one name, on one host or many, exactly one gets True.
  """
  if files.is_remote(directory):
    data = json.dumps(owner, indent=1, sort_keys=True).encode()
    # A create retried after its answer was lost finds its own first try there: ours too.
    yield lambda path: gcs.write_bytes(path, data, if_absent=True) or _read_claim(path) == owner
    return
  tmp = os.path.join(directory, f".claim.tmp-{os.getpid()}")
  files.atomic_write_json(tmp, owner)

  def create(path: str) -> bool:
    try:
      os.link(tmp, path)
      return True
    except FileExistsError:
      return False
  try:
    yield create
  finally:
    os.remove(tmp)


def sweep_claims(directory: str) -> None:
  """Removes the claims a killed worker left on shards it had finished (never written again)."""
  done = written_shards(directory)
  for name in files.listdir(directory):
    if name.startswith("shard_") and name.endswith(".claim") and \
        int(name[6:].split(".")[0]) in done:
      try:
        files.remove(files.join(directory, name))
      except FileNotFoundError:
        pass


def release_shards(directory: str, indices: Sequence[int]) -> None:
  """Removes this process's claims on `indices` (claims taken over by another are left)."""
  me = (os.getpid(), socket.gethostname())
  for i in indices:
    path = _claim_path(directory, i)
    claim = _read_claim(path)
    if claim and (claim.get("pid"), claim.get("host")) == me:
      files.remove(path)


# Spec keys that only say how long a store is. Windows are packed from the corpus in order and
# shard i holds windows i*W..(i+1)*W-1, so two stores whose specs differ in nothing else hold
# the same bytes in every shard that is full in both.
LENGTH_KEYS = ("requested_tokens", "num_windows", "num_shards")


def check_grow_source(directory: str, source: str) -> str:
  """The spec path of the store `source` a store at `directory` may grow from; JaxsaeError
  where it cannot be one, checked before a model loads (its spec is compared later)."""
  if _place(source) == _place(directory):
    raise JaxsaeError(f"--grow_from={source} is the store being written")
  src_spec_path = files.join(source, store.SPEC)
  if not files.exists(src_spec_path):
    raise JaxsaeError(f"--grow_from={source}: not an activation store (no {store.SPEC})")
  return src_spec_path


def _place(directory: str) -> str:
  return directory.rstrip("/") if files.is_remote(directory) else os.path.abspath(directory)


def adopt_shards(directory: str, source: str, indices: Sequence[int]) -> list[int]:
  """Takes shards `indices` from the store at `source` where it holds them whole; returns those.

  The stores' specs must agree in everything but their length (else JaxsaeError names the
  first keys that differ). A shard is taken only when it is full in both stores, so a shorter
  last shard on either side is left to be extracted. Files are hard-linked (copied across
  filesystems, and to or from gs:// through this host) under temporary names and renamed, the
  ledger entry last, as write_shard does. The caller must hold the claims on `indices`.
  """
  src_spec_path = check_grow_source(directory, source)
  theirs = _read_json(src_spec_path)
  ours = _read_json(files.join(directory, store.SPEC))
  details = _spec_differences(theirs, ours, "here", skip=LENGTH_KEYS)
  if details:
    raise JaxsaeError(f"--grow_from={source} is another store than this one, not a shorter "
                      f"one ({details})")
  wps = ours["windows_per_shard"]
  whole_here = ours["num_windows"] // wps
  theirs_done = written_shards(source)
  taken = []
  for i in indices:
    entry = theirs_done.get(i)
    if i >= whole_here or entry is None or entry["num_windows"] != wps:
      continue
    for key in ("file", "tokens_file", "scales_file"):
      if entry.get(key):
        _link_or_copy(files.join(source, entry[key]), files.join(directory, entry[key]))
    files.atomic_write_json(files.join(directory, store.shard_name(i) + ".json"), entry)
    taken.append(i)
  return taken


def _link_or_copy(src: str, dst: str) -> None:
  if files.is_remote(src) or files.is_remote(dst):
    files.atomic_write_bytes(dst, files.read_bytes(src))  # a shard at a time: tens of MB
    return
  tmp = f"{dst}.tmp-{os.getpid()}"
  try:
    try:
      os.link(src, tmp)
    except OSError:  # another filesystem, or one without hard links
      shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def finalize(directory: str) -> dict | None:
  """Writes manifest.json once every shard of the spec is written; returns it (None if not yet)."""
  manifest_path = files.join(directory, store.MANIFEST)
  if files.exists(manifest_path):
    return _read_json(manifest_path)
  spec = _read_json(files.join(directory, store.SPEC))
  done = written_shards(directory)
  if len(done) < spec["num_shards"]:
    return None
  shards = [done[i] for i in range(spec["num_shards"])]
  manifest = {
      **spec,
      "num_tokens": sum(s["num_tokens"] for s in shards),
      "shards": shards,
  }
  manifest["mean_norm"], manifest["outliers"] = _site_statistics(directory, manifest)
  files.atomic_write_json(manifest_path, manifest)
  sweep_claims(directory)
  # Said where the store is made, once: the trainer and the report repeat it.
  for site in manifest["sites"]:
    line = store.massive_warning(manifest, site)
    if line:
      print(line, flush=True)
  return manifest


def _norm_sample(num_tokens: int) -> np.ndarray:
  return np.linspace(0, num_tokens - 1, min(NORM_SAMPLE_ROWS, num_tokens)).astype(np.int64)


def _site_statistics(directory: str, manifest: dict) -> tuple[dict, dict]:
  """(mean L2 norm, `outlier_stats`) per site, from one read of an evenly spaced sample of rows:
  the norm for optional normalisation, the outliers to say where massive rows dominate."""
  rows = _norm_sample(manifest["num_tokens"])
  positions = _sample_positions(directory, manifest, rows)
  norms, outliers = {}, {}
  for site, x in _sampled_rows(directory, manifest, rows):
    row_norms = np.linalg.norm(x, axis=-1)
    norms[site] = float(row_norms.mean())
    outliers[site] = outlier_stats(x, row_norms, positions)
  return norms, outliers


def _mean_norms(directory: str, manifest: dict) -> dict[str, float]:
  """The manifest's mean_norm alone: mean L2 norm per site over the evenly spaced sample."""
  return {site: float(np.linalg.norm(x, axis=-1).mean()) for site, x in
          _sampled_rows(directory, manifest, _norm_sample(manifest["num_tokens"]))}


def _sampled_rows(directory: str, manifest: dict, rows: np.ndarray
                  ) -> Iterator[tuple[str, np.ndarray]]:
  """(site, float rows [len(rows), d_in]) of every site, a site at a time."""
  if files.is_remote(directory):
    yield from _remote_rows(directory, manifest, rows)
    return
  st = store.Store(directory, manifest=manifest)
  for site in st.sites:
    yield site, st.rows(rows, site=site)


def _remote_rows(directory: str, manifest: dict, rows: np.ndarray
                 ) -> Iterator[tuple[str, np.ndarray]]:
  """`_sampled_rows` of a gs:// store, bit for bit, from ranged reads of the sampled rows: the
  reader would fetch (and keep) every shard whole, the whole store, for a sample of 64K rows."""
  sites, shards = manifest["sites"], manifest["shards"]
  dtype, scaled = store.np_dtype(manifest["dtype"]), manifest["dtype"] in store.CODE_MAX
  offsets = np.concatenate([[0], np.cumsum([s["num_tokens"] for s in shards])])
  shard_of = np.searchsorted(offsets, rows, side="right") - 1

  def read(i: int) -> tuple[np.ndarray, np.ndarray | None]:
    local = rows[shard_of == i] - offsets[i]
    codes = _read_rows(files.join(directory, shards[i]["file"]), local,
                       (len(sites), manifest["d_in"]), dtype)
    if not scaled:
      return codes, None
    return codes, _read_rows(files.join(directory, shards[i]["scales_file"]), local,
                             (len(sites),), store.SCALE_DTYPE)
  with concurrent.futures.ThreadPoolExecutor(_GCS_THREADS) as pool:
    parts = list(pool.map(read, np.unique(shard_of)))
  codes = np.concatenate([c for c, _ in parts])
  scales = np.concatenate([s for _, s in parts]) if scaled else None
  for j, site in enumerate(sites):
    yield site, store.dequantize(codes[:, j], None if scales is None else scales[:, j])


def _sample_positions(directory: str, manifest: dict, rows: np.ndarray) -> np.ndarray | None:
  """The window position of each of `rows` (-1 where its shard's token file was not read), or
  None for a store of single-row windows, where a position says nothing."""
  ctx_len = manifest["ctx_len"]
  if ctx_len == 1 or not len(rows):
    return None
  st = store.Store(directory, manifest=manifest)
  shard_of = np.searchsorted(st.offsets, rows, side="right") - 1
  touched = np.unique(shard_of)
  chosen = touched[np.unique(np.linspace(0, len(touched) - 1,
                                         min(POSITION_SHARDS, len(touched))).astype(np.int64))]
  out = np.full(len(rows), -1, np.int64)

  def read(i: int) -> None:
    sel = shard_of == i
    out[sel] = st.tokens(i)[1][rows[sel] - st.offsets[i]] % ctx_len
  with concurrent.futures.ThreadPoolExecutor(_GCS_THREADS if st.remote else 1) as pool:
    list(pool.map(read, chosen))
  return out


def outlier_stats(x: np.ndarray, norms: np.ndarray, positions: np.ndarray | None = None,
                  top_positions: int = 8) -> dict:
  """How much a few rows and one dimension dominate a site, from a sample of its rows x [n, d]
  with their L2 norms and window positions (-1: unknown; None: none known).

  The figures the sites study measured (experiments/depth_study.outliers): the top dimension's
  share of the centred variance, the fraction of rows over store.MASSIVE_OVER_MEDIAN x the
  median norm and the largest norm over the median; and, what an FVU loss weighs, the massive
  rows' share of the centred variance. `positions` lists the window positions holding the most
  massive rows: the share of those rows at each, and the share of that position's rows that
  are massive (1.0 at SmolLM2's position 0).
  """
  n = len(x)
  mean = x.mean(0, dtype=np.float64)
  dim_var, row_var = np.zeros(x.shape[1]), np.empty(n)
  for lo in range(0, n, _CENTRE_ROWS):  # float64: massive rows dwarf the rest in float32 sums
    c = x[lo:lo + _CENTRE_ROWS] - mean
    c *= c
    dim_var += c.sum(0)
    row_var[lo:lo + _CENTRE_ROWS] = c.sum(1)
  total = float(dim_var.sum())
  median = float(np.median(norms)) if n else 0.0
  massive = norms > store.MASSIVE_OVER_MEDIAN * median
  stats = {
      "over_median": store.MASSIVE_OVER_MEDIAN, "sample_rows": int(n),
      "top_dim": int(dim_var.argmax()) if n else 0,
      "top_dim_variance": float(dim_var.max() / total) if total > 0 else 0.0,
      "massive_rows": float(massive.mean()) if n else 0.0,
      "massive_variance": float(row_var[massive].sum() / total) if total > 0 else 0.0,
      # None rather than inf: JSON has no infinity
      "max_norm_over_median": float(norms.max() / median) if median > 0 else None,
  }
  if positions is not None:
    known = positions >= 0
    rows_at = np.bincount(positions[known], minlength=1)
    hits = np.bincount(positions[known & massive], minlength=len(rows_at))
    order = [int(p) for p in np.argsort(-hits, kind="stable")[:top_positions] if hits[p]]
    stats["positions_sampled"] = int(known.sum())
    stats["positions"] = [{"position": p, "share": float(hits[p] / hits.sum()),
                           "massive": float(hits[p] / rows_at[p])} for p in order]
  return stats


def _read_rows(url: str, rows: np.ndarray, shape: tuple[int, ...], dtype: np.dtype
               ) -> np.ndarray:
  """Rows `rows` (ascending) [len(rows), *shape] of the raw array object at `url`, each run of
  rows less than _GCS_GAP_BYTES apart read as one range."""
  row_bytes = int(np.prod(shape)) * dtype.itemsize
  runs = np.split(rows, np.nonzero(np.diff(rows) * row_bytes > _GCS_GAP_BYTES)[0] + 1)
  out = []
  for run in runs:
    lo = int(run[0])
    block = np.frombuffer(gcs.read_range(url, lo * row_bytes, (int(run[-1]) + 1) * row_bytes),
                          dtype).reshape(-1, *shape)
    out.append(block[run - lo])
  return np.concatenate(out)


def write_store(directory: str, acts: np.ndarray, *, ids: np.ndarray | None = None,
                rows_per_shard: int = 4096, dtype: str = "float32",
                sites: Sequence[str] = ("site",), **spec) -> store.Store:
  """Writes activations [rows, d_in] (or [rows, n_sites, d_in]) as a complete store.

  For tests and for activations computed elsewhere; `ids` [rows] are their token ids (each row
  then stands as its own length-1 window).
  """
  if acts.ndim == 2:
    acts = acts[:, None, :]
  n, n_sites, d_in = acts.shape
  if ids is None:
    ids = np.zeros(n, np.int32)
  num_shards = -(-n // rows_per_shard)
  init_store(directory, {
      "model": spec.pop("model", "array"), "sites": list(sites), "d_in": d_in, "dtype": dtype,
      "ctx_len": 1, "num_shards": num_shards, "windows_per_shard": rows_per_shard,
      "excluded_tokens": [], **spec})
  for i in range(num_shards):
    sl = slice(i * rows_per_shard, (i + 1) * rows_per_shard)
    a = acts[sl]  # write_shard stores it in `dtype`
    write_shard(directory, i, a, ids[sl].reshape(-1, 1), np.arange(a.shape[0]))
  finalize(directory)
  return store.Store(directory)
