"""Writing an activation store: shards, their ledger entries, worker claims, the manifest.

The layout and the format are store.py's; this module only ever adds files to a directory.
Every file appears under its final name only once complete (files.atomic_write_*), and a shard
counts as written only when its ledger entry exists. Independent workers can therefore fill
disjoint shard ranges of one store (overlapping ones are refused by the claims), and a killed
extraction resumes at the first shard without a ledger entry. Whoever writes the last shard
writes the manifest.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import time
from typing import Sequence

import numpy as np

from jaxsae import files
from jaxsae import store
from jaxsae.errors import JaxsaeError

# Rows used to estimate the mean activation norm recorded in the manifest.
NORM_SAMPLE_ROWS = 65536


def init_store(directory: str, spec: dict) -> None:
  """Creates `directory` for `spec`, or checks that the store already there is the same one.

  `spec` must hold at least sites, d_in, dtype, ctx_len and num_shards; everything in it is part
  of the store's identity, so a rerun with other settings is refused instead of mixing data.
  """
  os.makedirs(directory, exist_ok=True)
  spec = {"format_version": store.FORMAT_VERSION, **spec}
  if store.row_scale(spec["dtype"]) is not None:  # float stores keep their spec as it was
    spec["row_scale"] = store.row_scale(spec["dtype"])
  path = os.path.join(directory, store.SPEC)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    details = _spec_differences(old, spec, "now")
    if details:
      raise JaxsaeError(
          f"{directory} holds a different store ({details}); "
          "choose a new --out or delete that directory")
    return
  if os.listdir(directory):
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
  with open(os.path.join(directory, store.SPEC)) as f:
    dtype = json.load(f)["dtype"]
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
  base = os.path.join(directory, name)
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
  return os.path.join(directory, store.shard_name(index) + ".claim")


def _read_claim(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, json.JSONDecodeError):
    return {}  # unreadable: treated as another worker's, so never taken silently


def _claim_is_stale(claim: dict, owner: dict) -> bool:
  """Whether `owner` may take `claim` over: its worker is gone, or it is being rerun.

  A worker on this host is gone when its pid is; on another host only a rerun of the very
  same range (a restarted worker) may take over, as that host's processes cannot be seen.
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

  A claim is a file shard_NNNNN.claim created atomically (a complete temporary file hard-linked
  under its final name, which fails if the name exists), so two workers given overlapping
  `--shard_range`s cannot both hold a shard; the second is refused before it writes anything.
  """
  owner = {"pid": os.getpid(), "host": socket.gethostname(), "range": shard_range,
           "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
  sweep_claims(directory)
  tmp = os.path.join(directory, f".claim.tmp-{os.getpid()}")
  files.atomic_write_json(tmp, owner)
  taken = []
  try:
    for i in indices:
      path = _claim_path(directory, i)
      while True:
        try:
          os.link(tmp, path)
          break
        except FileExistsError:
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
  finally:
    os.remove(tmp)


def sweep_claims(directory: str) -> None:
  """Removes the claims a killed worker left on shards it had finished (never written again)."""
  done = store.written_shards(directory)
  for name in os.listdir(directory):
    if name.startswith("shard_") and name.endswith(".claim") and \
        int(name[6:].split(".")[0]) in done:
      try:
        os.remove(os.path.join(directory, name))
      except FileNotFoundError:
        pass


def release_shards(directory: str, indices: Sequence[int]) -> None:
  """Removes this process's claims on `indices` (claims taken over by another are left)."""
  me = (os.getpid(), socket.gethostname())
  for i in indices:
    path = _claim_path(directory, i)
    claim = _read_claim(path)
    if claim and (claim.get("pid"), claim.get("host")) == me:
      os.remove(path)


# Spec keys that only say how long a store is. Windows are packed from the corpus in order and
# shard i holds windows i*W..(i+1)*W-1, so two stores whose specs differ in nothing else hold
# the same bytes in every shard that is full in both.
LENGTH_KEYS = ("requested_tokens", "num_windows", "num_shards")


def check_grow_source(directory: str, source: str) -> str:
  """The spec path of the store `source` a store at `directory` may grow from; JaxsaeError
  where it cannot be one, checked before a model loads (its spec is compared later)."""
  if os.path.abspath(source) == os.path.abspath(directory):
    raise JaxsaeError(f"--grow_from={source} is the store being written")
  src_spec_path = os.path.join(source, store.SPEC)
  if not os.path.exists(src_spec_path):
    raise JaxsaeError(f"--grow_from={source}: not an activation store (no {store.SPEC})")
  return src_spec_path


def adopt_shards(directory: str, source: str, indices: Sequence[int]) -> list[int]:
  """Takes shards `indices` from the store at `source` where it holds them whole; returns those.

  The stores' specs must agree in everything but their length (else JaxsaeError names the
  first keys that differ). A shard is taken only when it is full in both stores, so a shorter
  last shard on either side is left to be extracted. Files are hard-linked (copied across
  filesystems) under temporary names and renamed, the ledger entry last, as write_shard does.
  The caller must hold the claims on `indices`.
  """
  src_spec_path = check_grow_source(directory, source)
  with open(src_spec_path) as f:
    theirs = json.load(f)
  with open(os.path.join(directory, store.SPEC)) as f:
    ours = json.load(f)
  details = _spec_differences(theirs, ours, "here", skip=LENGTH_KEYS)
  if details:
    raise JaxsaeError(f"--grow_from={source} is another store than this one, not a shorter "
                      f"one ({details})")
  wps = ours["windows_per_shard"]
  whole_here = ours["num_windows"] // wps
  theirs_done = store.written_shards(source)
  taken = []
  for i in indices:
    entry = theirs_done.get(i)
    if i >= whole_here or entry is None or entry["num_windows"] != wps:
      continue
    for key in ("file", "tokens_file", "scales_file"):
      if entry.get(key):
        _link_or_copy(os.path.join(source, entry[key]), os.path.join(directory, entry[key]))
    files.atomic_write_json(os.path.join(directory, store.shard_name(i) + ".json"), entry)
    taken.append(i)
  return taken


def _link_or_copy(src: str, dst: str) -> None:
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
  if os.path.exists(os.path.join(directory, store.MANIFEST)):
    with open(os.path.join(directory, store.MANIFEST)) as f:
      return json.load(f)
  with open(os.path.join(directory, store.SPEC)) as f:
    spec = json.load(f)
  done = store.written_shards(directory)
  if len(done) < spec["num_shards"]:
    return None
  shards = [done[i] for i in range(spec["num_shards"])]
  manifest = {
      **spec,
      "num_tokens": sum(s["num_tokens"] for s in shards),
      "shards": shards,
  }
  manifest["mean_norm"] = _mean_norms(directory, manifest)
  files.atomic_write_json(os.path.join(directory, store.MANIFEST), manifest)
  sweep_claims(directory)
  return manifest


def _mean_norms(directory: str, manifest: dict) -> dict[str, float]:
  """Mean L2 norm per site over an evenly spaced sample of rows, for optional normalisation."""
  st = store.Store(directory, manifest=manifest)
  n = min(NORM_SAMPLE_ROWS, st.num_tokens)
  rows = np.linspace(0, st.num_tokens - 1, n).astype(np.int64)
  norms = {}
  for site in st.sites:
    x = st.rows(rows, site=site)
    norms[site] = float(np.linalg.norm(x, axis=-1).mean())
  return norms


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
