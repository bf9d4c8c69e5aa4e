"""What the three layouts share: reading JSON and safetensors, refusing a field in one line that
names its file, the architecture family a name encodes by, and writing an SAE directory whole."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Sequence

import numpy as np

from jaxsae.errors import JaxsaeError

CFG_FILE = "cfg.json"  # sparsify's and SAELens's settings (dictionary_learning's is config.json)
SHARED = ("W_enc", "b_enc", "W_dec", "b_dec")  # jaxsae's names of the weights every SAE has


def read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise JaxsaeError(f"{path} is not valid JSON ({e}); re-export the SAE")


def read_tensors(path: str) -> dict[str, np.ndarray]:
  from safetensors import safe_open
  try:
    out = {}
    # pt-free loading: numpy framework, and bfloat16 via ml_dtypes then up-cast to float32.
    with safe_open(path, framework="numpy") as f:
      for key in f.keys():
        out[key] = np.asarray(f.get_tensor(key)).astype(np.float32)
    return out
  except Exception as e:  # safetensors raises its own types for truncated or foreign files
    raise JaxsaeError(f"cannot read {path} ({type(e).__name__}: {e}); the file is truncated "
                      "or not safetensors: re-export the SAE")


def family_or_none(name: str) -> str | None:
  from jaxsae.sae import FAMILY_OF
  return FAMILY_OF.get(str(name).lower())


def family(name: str) -> str:
  """The family of an architecture named by any library (SAELens's "standard" is ReLU, jaxsae's
  matryoshka encodes as batchtopk once trained): the architecture classes say which."""
  found = family_or_none(name)
  if found is None:
    from jaxsae.sae import READERS
    raise JaxsaeError(f"unknown SAE architecture {str(name).lower()!r}; jaxsae matches "
                      f"{', '.join(READERS)}")
  return found


def need(tensors: dict, keys: Sequence[str], path: str) -> None:
  missing = [k for k in keys if k not in tensors]
  if missing:
    raise JaxsaeError(f"{path} lacks {', '.join(missing)} (has {', '.join(sorted(tensors))}); "
                      "it is not a complete SAE: re-export it")


def refuse(file: str, what: str) -> JaxsaeError:
  return JaxsaeError(f"{file}: {what}")


def unknown_tensors(t: dict, known: set[str], file: str, arch: str) -> None:
  """A tensor no firing rule of jaxsae's reads would change the SAE's output unseen: refused."""
  extra = sorted(set(t) - known)
  if extra:
    raise refuse(file, f"tensor{'s' if len(extra) > 1 else ''} {', '.join(extra)} "
                 f"{'are' if len(extra) > 1 else 'is'} not part of a {arch} SAE as jaxsae "
                 "encodes it; jaxsae does not read SAEs that need them")


# Writing: jaxsae's params (W_enc [d_in, n], as the trainer holds them) and its description.


def fold_input_scale(params: dict[str, np.ndarray], scale: float) -> dict[str, np.ndarray]:
  """Weights that encode raw rows x as `params` encode x * scale, and reconstruct x itself.

  pre = (x s - b_dec) W_enc + b_enc = (x - b_dec / s)(s W_enc) + b_enc, so every firing rule
  (its thresholds and gates act on pre) gives the same codes z; z W_dec / s + b_dec / s is the
  reconstruction divided by s.
  """
  out = {k: np.asarray(v, np.float32) for k, v in params.items()}
  if scale == 1.0:
    return out
  s = np.float32(scale)
  out["W_enc"], out["W_dec"], out["b_dec"] = out["W_enc"] * s, out["W_dec"] / s, out["b_dec"] / s
  return out


def arch_class(cfg: dict[str, Any]):
  """The class of cfg's "arch": a jaxsae architecture, or the family an SAE read from another
  library encodes by (a consensus of SAELens's standard SAEs is "relu")."""
  from jaxsae.sae import ARCHITECTURES, FAMILY_OF, READERS
  name = cfg.get("arch", "topk")
  return ARCHITECTURES.get(name) or READERS[FAMILY_OF[name]]


def own(cfg: dict[str, Any]) -> dict[str, Any]:
  """jaxsae's description as stored: the input scale recorded as folded."""
  out = dict(cfg)
  out["input_scale_folded"] = float(out.pop("input_scale", 1.0))
  return out


def check_shapes(p: dict[str, np.ndarray]) -> tuple[int, int]:
  d_in, n = p["W_enc"].shape
  if p["W_dec"].shape != (n, d_in) or p["b_dec"].shape != (d_in,) or p["b_enc"].shape != (n,):
    raise ValueError(f"inconsistent SAE shapes: W_enc {p['W_enc'].shape}, b_enc "
                     f"{p['b_enc'].shape}, W_dec {p['W_dec'].shape}, b_dec {p['b_dec'].shape}")
  return d_in, n


def write_dir(directory: str, weights_file: str, tensors: dict[str, np.ndarray],
              cfg: dict[str, Any]) -> None:
  """`directory` with `weights_file` and cfg.json, atomically: readers see the old SAE or the new
  one, never half."""
  from safetensors.numpy import save_file  # lazily: only export needs it

  parent = os.path.dirname(os.path.abspath(directory))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
  try:
    save_file(tensors, os.path.join(tmp, weights_file))
    with open(os.path.join(tmp, CFG_FILE), "w") as f:
      json.dump(cfg, f, indent=1, sort_keys=True)
    # mkdtemp makes the folder private, and safetensors may write its file so: the export is
    # for others to read.
    os.chmod(tmp, 0o755)
    for name in (weights_file, CFG_FILE):
      os.chmod(os.path.join(tmp, name), 0o644)
      with open(os.path.join(tmp, name), "rb") as f:
        os.fsync(f.fileno())
    if os.path.exists(directory):
      # A directory cannot be renamed over a non-empty one: move the old aside first.
      old = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.old-", dir=parent)
      os.replace(directory, os.path.join(old, "x"))
      os.replace(tmp, directory)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
