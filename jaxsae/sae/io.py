"""Export one SAE in the layout of another library, written only where that library encodes it
as jaxsae does.

  sparsify  cfg.json + sae.safetensors: encoder.weight [n, d_in] (= W_enc.T), encoder.bias [n],
            W_dec [n, d_in], b_dec [d_in]. sparsify's SparseCoder encodes TopK only (its other
            activation, groupmax, is not one jaxsae trains), so only an architecture with a
            `sparsify_activation` is written in it; `save_sparsify` refuses the others.
  saelens   cfg.json + sae_weights.safetensors: W_enc [d_in, n], b_enc [n] (Gated: b_gate),
            W_dec [n, d_in], b_dec [d_in] + the architecture's extras (JumpReLU's threshold
            [n]; Gated's b_mag, r_mag), under the SAELens class that encodes it exactly
            (`SAE.saelens_architecture`): BatchTopK and Matryoshka as JumpReLU with their one
            threshold on every latent, which is how SAELens saves its own for inference.

Both cfg.json files carry jaxsae's own description under "jaxsae" (arch, seed, k, step,
num_tokens, store, site, data_seed, ...), which neither library reads.

The trainer's input scale (--normalize: the store's rows times a constant) is folded into the
weights, as SAELens's fold_activation_norm_scaling_factor does: W_enc * s, W_dec / s, b_dec / s
give the same codes from raw rows, and the reconstruction in the rows' own units. A file holds
no scale for a reader to forget; cfg.json records the factor folded as "input_scale_folded".
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Callable

import numpy as np

CFG = "cfg.json"
WEIGHTS = "sae.safetensors"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SHARED = ("W_enc", "b_enc", "W_dec", "b_dec")
LAYOUTS = ("sparsify", "saelens")
# The SAELens cfg.json format this writes (SAELens reads older ones through a converter).
SAELENS_FORMAT = "6.0.0"


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


def _arch_class(cfg: dict[str, Any]):
  """The class of cfg's "arch": a jaxsae architecture, or the family an SAE read from another
  library encodes by (a consensus of SAELens's standard SAEs is "relu")."""
  from jaxsae.sae import ARCHITECTURES, FAMILY_OF, READERS
  name = cfg.get("arch", "topk")
  return ARCHITECTURES.get(name) or READERS[FAMILY_OF[name]]


def _own(cfg: dict[str, Any]) -> dict[str, Any]:
  """jaxsae's description as stored: the input scale recorded as folded."""
  own = dict(cfg)
  own["input_scale_folded"] = float(own.pop("input_scale", 1.0))
  return own


def save_sparsify(directory: str, params: dict[str, np.ndarray], cfg: dict[str, Any]) -> None:
  """Writes `directory` atomically in sparsify's layout: readers see the old export or the new
  one, never half.

  Args:
    directory: the SAE's folder, e.g. RUN/seed0.
    params: W_enc [d_in, n], b_enc [n], W_dec [n, d_in], b_dec [d_in] and any extras, as the
      trainer holds them (in its input scale).
    cfg: jaxsae's description (arch, seed, k, input_scale, ...), stored under "jaxsae"; "k"
      and "normalize_decoder" also fill sparsify's fields.
  """
  cls = _arch_class(cfg)
  if cls.sparsify_activation is None:
    raise ValueError(f"sparsify cannot encode a {cls.name} SAE (it encodes TopK only); write "
                     "it in SAELens's layout")
  p = fold_input_scale(params, float(cfg.get("input_scale", 1.0)))
  d_in, n = _check(p)
  extras = sorted(set(p) - set(SHARED))
  if extras:  # sparsify loads strictly: it would refuse the file anyway
    raise ValueError(f"sparsify's layout holds no {', '.join(extras)}")
  tensors = {"encoder.weight": np.ascontiguousarray(p["W_enc"].T), "encoder.bias": p["b_enc"],
             "W_dec": p["W_dec"], "b_dec": p["b_dec"]}
  sparsify_cfg = {
      "activation": cls.sparsify_activation,
      "expansion_factor": max(n // d_in, 1),
      "normalize_decoder": bool(cfg.get("normalize_decoder", True)),
      "num_latents": int(n),
      "k": int(cfg.get("k", 0)),
      "multi_topk": False,
      "skip_connection": False,
      "transcode": False,
      "d_in": int(d_in),
      "jaxsae": _own(cfg),
  }
  _write(directory, WEIGHTS, tensors, sparsify_cfg)


def save_saelens(directory: str, params: dict[str, np.ndarray], cfg: dict[str, Any]) -> None:
  """Writes `directory` atomically in SAELens's layout, as the SAELens class that encodes the
  architecture exactly, so that `sae_lens.SAE.load_from_disk` reproduces jaxsae's codes and
  reconstructions. Arguments as `save_sparsify`'s; cfg's "site" becomes metadata.hook_name."""
  cls = _arch_class(cfg)
  arch = cls.saelens_architecture
  if arch is None:
    raise ValueError(f"SAELens has no class that encodes a {cls.name} SAE")
  p = fold_input_scale(params, float(cfg.get("input_scale", 1.0)))
  d_in, n = _check(p)
  if "threshold" in p:  # BatchTopK's one threshold, on every latent as JumpReLU keeps it
    p["threshold"] = np.broadcast_to(p["threshold"], (n,)).copy()
  expected = {"standard": set(), "topk": set(), "jumprelu": {"threshold"},
              "gated": {"b_mag", "r_mag"}}[arch]
  if set(p) - set(SHARED) != expected:
    raise ValueError(f"a {cls.name} SAE with tensors {sorted(p)} is not SAELens's {arch}")
  tensors = {cls.saelens_names.get(k, k): np.ascontiguousarray(v) for k, v in p.items()}
  lens_cfg: dict[str, Any] = {
      "architecture": arch, "d_in": int(d_in), "d_sae": int(n), "dtype": "float32",
      "device": "cpu", "apply_b_dec_to_input": bool(cfg.get("apply_b_dec_to_input", True)),
      "normalize_activations": "none", "reshape_activations": "none",
      "metadata": {"sae_lens_version": SAELENS_FORMAT, "sae_lens_training_version": None,
                   "hook_name": cfg.get("site"), "model_name": cfg.get("model")},
      "jaxsae": _own(cfg),
  }
  if arch == "topk":
    # Decoder rows may not be unit norm once the input scale is folded: SAELens must select
    # by the codes as they are, not rescaled by those norms.
    lens_cfg.update(k=int(cfg["k"]), rescale_acts_by_decoder_norm=False)
  _write(directory, SAELENS_WEIGHTS, tensors, lens_cfg)


SAVERS: dict[str, Callable[[str, dict, dict], None]] = {"sparsify": save_sparsify,
                                                        "saelens": save_saelens}


def writes(layout: str, arch: str) -> bool:
  """Whether `layout` can hold an SAE of architecture `arch` so that its library encodes it as
  jaxsae does."""
  cls = _arch_class({"arch": arch})
  attr = {"saelens": cls.saelens_architecture, "sparsify": cls.sparsify_activation}[layout]
  return attr is not None


def _check(p: dict[str, np.ndarray]) -> tuple[int, int]:
  d_in, n = p["W_enc"].shape
  if p["W_dec"].shape != (n, d_in) or p["b_dec"].shape != (d_in,) or p["b_enc"].shape != (n,):
    raise ValueError(f"inconsistent SAE shapes: W_enc {p['W_enc'].shape}, b_enc "
                     f"{p['b_enc'].shape}, W_dec {p['W_dec'].shape}, b_dec {p['b_dec'].shape}")
  return d_in, n


def _write(directory: str, weights_file: str, tensors: dict[str, np.ndarray],
           cfg: dict[str, Any]) -> None:
  from safetensors.numpy import save_file  # lazily: only export needs it

  parent = os.path.dirname(os.path.abspath(directory))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
  try:
    save_file(tensors, os.path.join(tmp, weights_file))
    with open(os.path.join(tmp, CFG), "w") as f:
      json.dump(cfg, f, indent=1, sort_keys=True)
    # mkdtemp makes the folder private, and safetensors may write its file so: the export is
    # for others to read.
    os.chmod(tmp, 0o755)
    for name in (weights_file, CFG):
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


def load(directory: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(params in jaxsae's names, cfg.json) of an export of `save_sparsify` or `save_saelens`, as
  stored (input scale folded): W_enc [d_in, n], b_enc, W_dec, b_dec and the extras."""
  from safetensors.numpy import load_file

  with open(os.path.join(directory, CFG)) as f:
    cfg = json.load(f)
  if os.path.isfile(os.path.join(directory, SAELENS_WEIGHTS)):
    tensors = load_file(os.path.join(directory, SAELENS_WEIGHTS))
    if "b_gate" in tensors:
      tensors["b_enc"] = tensors.pop("b_gate")
    return tensors, cfg
  tensors = load_file(os.path.join(directory, WEIGHTS))
  params = {"W_enc": tensors.pop("encoder.weight").T, "b_enc": tensors.pop("encoder.bias"),
            "W_dec": tensors.pop("W_dec"), "b_dec": tensors.pop("b_dec"), **tensors}
  return params, cfg
