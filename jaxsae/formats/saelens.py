"""SAELens's layout, read and written: cfg.json + sae_weights.safetensors.

  W_enc [d_in, n], b_enc [n] (Gated: b_gate), W_dec [n, d_in], b_dec [d_in] + the architecture's
  extras (JumpReLU's threshold [n]; Gated's b_mag, r_mag; a BatchTopK training checkpoint's
  topk_threshold)

Written for every architecture, under the SAELens class that encodes it exactly
(`SAE.saelens_architecture`): BatchTopK and Matryoshka as JumpReLU with their one threshold on
every latent, which is how SAELens saves its own for inference. Read: SAELens's inference SAEs
and training checkpoints, and jaxsae's exports (a JumpReLU whose "jaxsae" arch is BatchTopK is
read back under its name).

Of cfg.json, applied: architecture, activation_fn (relu, or topk in older files), k,
apply_b_dec_to_input, normalize_activations (none, layer_norm, constant_norm_rescale, and
expected_average_only_in with activation_scaler.json's factor folded),
rescale_acts_by_decoder_norm, and the site (metadata.hook_name); refused: any other
architecture, activation or normalize_activations, reshape_activations but none and hook_z,
finetuning_scaling_factor, a scaling_factor tensor that is not all ones, and every tensor the
architecture does not read. The rest (hook and model metadata, dtype, device, training settings)
do not change how it encodes.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from jaxsae.errors import JaxsaeError
from jaxsae.formats import common
from jaxsae.formats.canonical import CanonicalSAE
from jaxsae.formats.common import CFG_FILE, SHARED

WEIGHTS_FILE = "sae_weights.safetensors"
FILES = (CFG_FILE, WEIGHTS_FILE)
ACTIVATION_SCALER_FILE = "activation_scaler.json"  # SAELens's trainer-state scaling factor
# The cfg.json format this writes (SAELens reads older ones through a converter).
FORMAT_VERSION = "6.0.0"
# SAELens's per-row input normalisations that jaxsae applies (sae_lens.SAE's
# run_time_activation_norm_fn_in, mirrored in `saes.sae_input`).
INPUT_NORMS = ("none", "layer_norm", "constant_norm_rescale")
# The tensors each family's file holds beside W_enc, b_enc, W_dec and b_dec.
_TENSORS = {"relu": set(), "topk": set(), "jumprelu": {"threshold"},
            "gated": {"b_gate", "b_mag", "r_mag"}, "batchtopk": {"topk_threshold"}}


def read(path: str, name: str, cfg: dict) -> CanonicalSAE:
  """SAELens's files, inference SAEs (save_model / save_inference_model) and training
  checkpoints alike, encoded as `sae_lens.SAE.load_from_disk` (or, for a BatchTopK training
  checkpoint, its save_inference_model) encodes them."""
  file, cfg_file = os.path.join(path, WEIGHTS_FILE), os.path.join(path, CFG_FILE)
  t = common.read_tensors(file)
  lens_arch = cfg.get("architecture", "standard")
  act = cfg.get("activation_fn_str") or cfg.get("activation_fn")
  if lens_arch == "standard" and act == "topk":  # older SAELens marked TopK by activation only
    lens_arch = "topk"
  elif lens_arch == "standard" and act not in (None, "relu"):
    raise common.refuse(cfg_file, f"activation_fn {act!r}: jaxsae encodes SAELens's standard "
                        "SAEs with relu only")
  try:
    arch = common.family(lens_arch)
  except JaxsaeError:
    raise common.refuse(cfg_file, f"architecture {lens_arch!r} is not one jaxsae encodes (it "
                        "reads SAELens's standard, topk, jumprelu, gated, batchtopk and "
                        "matryoshka_batchtopk)") from None
  if "log_threshold" in t and "threshold" not in t:  # as SAELens's JumpReLU loader converts
    t["threshold"] = np.exp(t.pop("log_threshold"))
  enc_bias = "b_gate" if arch == "gated" else "b_enc"
  common.need(t, ("W_enc", enc_bias, "W_dec", "b_dec", *sorted(_TENSORS[arch] - {"b_gate"})),
              file)
  if "scaling_factor" in t and np.allclose(t["scaling_factor"], 1.0):
    del t["scaling_factor"]  # SAELens drops an all-ones one too
  if "scaling_factor" in t:
    raise common.refuse(file, "scaling_factor (the finetuning scaling factor of early "
                        "SAELens): jaxsae does not read it; fold it into W_dec and save the SAE "
                        "again")
  common.unknown_tensors(t, {"W_enc", "b_enc", "W_dec", "b_dec", *_TENSORS[arch]}, file,
                         lens_arch)
  w_enc = t["W_enc"]
  d_in, d_sae = cfg.get("d_in"), cfg.get("d_sae")
  if w_enc.ndim != 2 or (d_in is not None and w_enc.shape[0] != d_in) or (
      d_sae is not None and w_enc.shape[1] != d_sae):
    raise JaxsaeError(f"{file}: W_enc has shape {list(w_enc.shape)}, but SAELens stores it as "
                      f"[d_in, d_sae] = [{d_in}, {d_sae}] per {CFG_FILE}; fix d_in/d_sae there")
  w_enc, b_enc, w_dec = w_enc.T.copy(), t[enc_bias], t["W_dec"]
  extras = {"threshold": t["threshold"]} if arch == "jumprelu" else {}
  if arch == "gated":
    extras = {"b_mag": t["b_mag"], "r_mag": t["r_mag"]}
  if arch == "jumprelu":
    # SAELens fires where pre > threshold on ReLU(pre): where pre > max(threshold, 0).
    extras["threshold"] = np.maximum(extras["threshold"], 0.0)
  if arch == "batchtopk":  # a training checkpoint: its inference rule is one threshold
    extras = {"threshold": np.maximum(t["topk_threshold"].reshape(()), 0.0)}
  own_arch = str((cfg.get("jaxsae") or {}).get("arch", ""))
  if (arch == "jumprelu" and common.family_or_none(own_arch) == "batchtopk"
      and np.unique(extras["threshold"]).size == 1):
    # jaxsae's own BatchTopK or Matryoshka export: the same rule, read back under its name.
    arch, extras = "batchtopk", {"threshold": extras["threshold"][0]}
  b_dec = t["b_dec"]
  norm_mode = cfg.get("normalize_activations") or "none"
  if norm_mode == "expected_average_only_in":
    # Folded as SAELens's fold_activation_norm_scaling_factor folds it at the end of training,
    # before the decoder norms below: with rescale_acts_by_decoder_norm the order sets the
    # codes' scale, and this is the order SAELens's final SAE has.
    s = np.float32(_scaling_factor(path, cfg_file))
    w_enc, w_dec, b_dec, norm_mode = w_enc * s, w_dec / s, b_dec / s, "none"
  if cfg.get("rescale_acts_by_decoder_norm"):
    # SAELens selects and fires on pre * |W_dec[i]| and decodes z / |W_dec[i]|: the same
    # codes as decoder rows of unit norm with the norms folded into the encoder.
    norm = np.maximum(np.linalg.norm(w_dec, axis=1), 1e-8)
    w_enc, b_enc, w_dec = w_enc * norm[:, None], b_enc * norm, w_dec / norm[:, None]
  if norm_mode not in INPUT_NORMS:
    raise common.refuse(cfg_file, f"normalize_activations {norm_mode!r}: jaxsae applies "
                        f"{', '.join(INPUT_NORMS)} and expected_average_only_in; fold it into "
                        "the weights with SAELens (fold_activation_whitening) and save again")
  if cfg.get("reshape_activations", "none") not in ("none", "hook_z"):
    # hook_z only flattens heads, as the store's rows already are.
    raise common.refuse(cfg_file, f"reshape_activations {cfg['reshape_activations']!r} is not "
                        "one jaxsae reads")
  if cfg.get("finetuning_scaling_factor"):
    raise common.refuse(cfg_file, "finetuning_scaling_factor: jaxsae does not read it; fold it "
                        "into W_dec and save the SAE again")
  meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
  k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
  return CanonicalSAE(name=name, path=path, layout="saelens", arch=arch,
                      W_enc=np.ascontiguousarray(w_enc), b_enc=b_enc,
                      W_dec=np.ascontiguousarray(w_dec), b_dec=b_dec,
                      k=None if k is None or arch != "topk" else int(k),
                      extras={key: np.asarray(v, np.float32) for key, v in extras.items()},
                      cfg=cfg, subtract_b_dec=bool(cfg.get("apply_b_dec_to_input", True)),
                      input_norm=norm_mode,
                      site=meta.get("hook_name") or cfg.get("hook_name")
                      or (cfg.get("jaxsae") or {}).get("site"))


def _scaling_factor(path: str, cfg_file: str) -> float:
  """The factor a SAELens checkpoint trained with expected_average_only_in scales its inputs
  by: its trainer folds it into the weights at the end, a checkpoint before keeps it beside."""
  scaler = os.path.join(path, ACTIVATION_SCALER_FILE)
  factor = common.read_json(scaler).get("scaling_factor") if os.path.isfile(scaler) else None
  if factor is None:
    raise common.refuse(cfg_file, "normalize_activations \"expected_average_only_in\" with no "
                        f"scaling_factor in {ACTIVATION_SCALER_FILE} beside it: the factor its "
                        "inputs were scaled by is unknown; fold it with SAELens "
                        "(fold_activation_norm_scaling_factor) and save again")
  return float(factor)


def write(directory: str, params: dict[str, np.ndarray], cfg: dict[str, Any]) -> None:
  """Writes `directory` atomically in SAELens's layout, as the SAELens class that encodes the
  architecture exactly, so that `sae_lens.SAE.load_from_disk` reproduces jaxsae's codes and
  reconstructions. Arguments as `sparsify.write`'s; cfg's "site" becomes metadata.hook_name."""
  cls = common.arch_class(cfg)
  arch = cls.saelens_architecture
  if arch is None:
    raise ValueError(f"SAELens has no class that encodes a {cls.name} SAE")
  p = common.fold_input_scale(params, float(cfg.get("input_scale", 1.0)))
  d_in, n = common.check_shapes(p)
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
      "metadata": {"sae_lens_version": FORMAT_VERSION, "sae_lens_training_version": None,
                   "hook_name": cfg.get("site"), "model_name": cfg.get("model")},
      "jaxsae": common.own(cfg),
  }
  if arch == "topk":
    # Decoder rows may not be unit norm once the input scale is folded: SAELens must select
    # by the codes as they are, not rescaled by those norms.
    lens_cfg.update(k=int(cfg["k"]), rescale_acts_by_decoder_norm=False)
  common.write_dir(directory, WEIGHTS_FILE, tensors, lens_cfg)


def writes(arch_cls) -> bool:
  """Whether SAELens has a class that encodes the architecture class `arch_cls` as jaxsae
  does."""
  return arch_cls.saelens_architecture is not None


def stored(directory: str) -> dict[str, np.ndarray]:
  """The params `write` stored, in jaxsae's names (input scale folded; Gated's b_gate as
  b_enc)."""
  t = common.read_tensors(os.path.join(directory, WEIGHTS_FILE))
  if "b_gate" in t:
    t["b_enc"] = t.pop("b_gate")
  return t
