"""Export one SAE as `cfg.json` + `sae.safetensors`, the layout EleutherAI's sparsify loads.

  sae.safetensors   encoder.weight [n, d_in] (= W_enc.T), encoder.bias [n], W_dec [n, d_in],
                    b_dec [d_in], + the architecture's extras under their own names
                    (threshold for JumpReLU [n] and BatchTopK [], r_mag and b_mag for Gated)
  cfg.json          sparsify's SparseCoderConfig fields and d_in (what
                    `SparseCoder.load_from_disk` reads), and jaxsae's own under "jaxsae":
                    arch, seed, k, step, num_tokens, store, site, data_seed, input_scale,
                    apply_b_dec_to_input

sparsify only knows TopK and loads strictly (no extra tensors), so TopK exports load and behave
the same there; every export reads back with `load_sparsify` and jaxsae's matcher.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np

CFG = "cfg.json"
WEIGHTS = "sae.safetensors"
SHARED = ("W_enc", "b_enc", "W_dec", "b_dec")


def save_sparsify(directory: str, params: dict[str, np.ndarray], cfg: dict[str, Any]) -> None:
  """Writes `directory` atomically: readers see the old export or the new one, never half.

  Args:
    directory: the SAE's folder, e.g. RUN/seed0.
    params: W_enc [d_in, n], b_enc [n], W_dec [n, d_in], b_dec [d_in] and any extras.
    cfg: jaxsae's description (arch, seed, num_tokens, store, ...), stored under "jaxsae";
      "k" (default 0) and "normalize_decoder" (default True) also fill sparsify's fields, and
      "activation" (default "topk") names sparsify's activation.
  """
  from safetensors.numpy import save_file  # lazily: only export needs it

  w_enc = np.asarray(params["W_enc"], np.float32)
  d_in, n = w_enc.shape
  tensors = {
      "encoder.weight": np.ascontiguousarray(w_enc.T),
      "encoder.bias": np.asarray(params["b_enc"], np.float32),
      "W_dec": np.asarray(params["W_dec"], np.float32),
      "b_dec": np.asarray(params["b_dec"], np.float32),
  }
  for name, value in params.items():
    if name not in SHARED:
      tensors[name] = np.ascontiguousarray(np.asarray(value, np.float32))
  if tensors["W_dec"].shape != (n, d_in) or tensors["b_dec"].shape != (d_in,):
    raise ValueError(f"inconsistent SAE shapes: W_enc {w_enc.shape}, W_dec "
                     f"{tensors['W_dec'].shape}, b_dec {tensors['b_dec'].shape}")
  sparsify_cfg = {
      "activation": cfg.get("activation") or "topk",
      "expansion_factor": max(n // d_in, 1),
      "normalize_decoder": bool(cfg.get("normalize_decoder", True)),
      "num_latents": int(n),
      "k": int(cfg.get("k", 0)),
      "multi_topk": False,
      "skip_connection": False,
      "transcode": False,
      "d_in": int(d_in),
      "jaxsae": dict(cfg),
  }
  parent = os.path.dirname(os.path.abspath(directory))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
  os.chmod(tmp, 0o755)  # mkdtemp makes it private; the export is for others to read
  try:
    save_file(tensors, os.path.join(tmp, WEIGHTS))
    with open(os.path.join(tmp, CFG), "w") as f:
      json.dump(sparsify_cfg, f, indent=1, sort_keys=True)
    for name in (WEIGHTS, CFG):
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


def load_sparsify(directory: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(params in jaxsae's layout, cfg.json) from an export of `save_sparsify` or of sparsify."""
  from safetensors.numpy import load_file

  with open(os.path.join(directory, CFG)) as f:
    cfg = json.load(f)
  tensors = load_file(os.path.join(directory, WEIGHTS))
  params = {"W_enc": tensors.pop("encoder.weight").T, "b_enc": tensors.pop("encoder.bias"),
            "W_dec": tensors.pop("W_dec"), "b_dec": tensors.pop("b_dec"), **tensors}
  return params, cfg
