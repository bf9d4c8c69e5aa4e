"""SAE files from any trainer, read into one canonical form for matching.

Three layouts on disk:

  sparsify (EleutherAI; jaxsae's TopK export)  cfg.json + sae.safetensors
      encoder.weight [n, d_in], encoder.bias [n], W_dec [n, d_in], b_dec [d_in]
  SAELens (jaxsae's export of the others)      cfg.json + sae_weights.safetensors
      W_enc [d_in, n], b_enc [n] (Gated: b_gate), W_dec [n, d_in], b_dec [d_in] (+ threshold,
      b_mag and r_mag, or a training checkpoint's topk_threshold)
  dictionary_learning (saprmarks)              config.json + ae.pt (a torch state dict)
      per dict_class, e.g. AutoEncoderTopK: encoder.weight [n, d_in], encoder.bias [n],
      decoder.weight [d_in, n], b_dec [d_in], k []; JumpReluAutoEncoder: W_enc [d_in, n], ...

All become a `CanonicalSAE` whose encoder AND decoder are `[n_latents, d_in]`: one row per latent.
Every field of a file that changes how it encodes is applied here or refused in one line naming
it (README, "SAEs in other libraries"); none is ignored.
Normalising a SAELens `W_enc` along its stored last axis would normalise across latents instead
of within one, a mistake made in the paper's own notebook; canonicalising on load rules it out.

A jaxsae training run is a directory of `seed{N}/` SAE directories and `run.json`; any other
directory of SAE folders (a downloaded release, dictionary_learning's `trainer_{N}/`) expands to
each of them. `hf://OWNER/REPO[/SUBFOLDER][@REVISION]` names SAEs on the Hugging Face Hub
(`jaxsae.hub`), read from its local cache.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, NamedTuple, Sequence

import numpy as np

from jaxsae import hub
from jaxsae.errors import JaxsaeError

SPARSIFY_FILE = "sae.safetensors"
SAELENS_FILE = "sae_weights.safetensors"
CFG_FILE = "cfg.json"
DL_FILE = "ae.pt"  # dictionary_learning's weights
DL_CFG_FILE = "config.json"  # and its settings, {"trainer": {"dict_class": ..., ...}, ...}
LAYOUTS = {"sparsify": (CFG_FILE, SPARSIFY_FILE), "saelens": (CFG_FILE, SAELENS_FILE),
           "dictionary_learning": (DL_CFG_FILE, DL_FILE)}


@dataclasses.dataclass(frozen=True)
class CanonicalSAE:
  """One SAE in canonical layout: every weight matrix is [n_latents, d_in]."""
  name: str
  path: str
  layout: str  # a key of LAYOUTS
  arch: str  # the family whose firing rule encodes it (jaxsae.sae.READERS)
  W_enc: np.ndarray  # [n, d_in]
  b_enc: np.ndarray  # [n]
  W_dec: np.ndarray  # [n, d_in]
  b_dec: np.ndarray  # [d_in]
  k: int | None  # active latents per token for topk
  extras: dict[str, np.ndarray]  # e.g. threshold [n] or []
  cfg: dict[str, Any]
  subtract_b_dec: bool = True  # SAELens' and jaxsae's apply_b_dec_to_input
  input_scale: float = 1.0  # the factor the trainer applied to store activations
  site: str | None = None  # the store site the SAE was trained on
  input_norm: str = "none"  # a per-row normalisation before encoding (INPUT_NORMS)

  @property
  def n_latents(self) -> int:
    return int(self.W_dec.shape[0])

  @property
  def d_in(self) -> int:
    return int(self.W_dec.shape[1])

  @property
  def store(self) -> str | None:
    """The activation store this SAE was trained on, when its cfg records one."""
    return (self.cfg.get("jaxsae") or {}).get("store")


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise JaxsaeError(f"{path} is not valid JSON ({e}); re-export the SAE")


def _read_tensors(path: str) -> dict[str, np.ndarray]:
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


def _family_or_none(name: str) -> str | None:
  from jaxsae.sae import FAMILY_OF
  return FAMILY_OF.get(str(name).lower())


def _arch(name: str) -> str:
  """The family of an architecture named by any library (SAELens's "standard" is ReLU, jaxsae's
  matryoshka encodes as batchtopk once trained): the architecture classes say which."""
  family = _family_or_none(name)
  if family is None:
    from jaxsae.sae import READERS
    raise JaxsaeError(f"unknown SAE architecture {str(name).lower()!r}; jaxsae matches "
                      f"{', '.join(READERS)}")
  return family


def _need(tensors: dict, keys: Sequence[str], path: str) -> None:
  missing = [k for k in keys if k not in tensors]
  if missing:
    raise JaxsaeError(f"{path} lacks {', '.join(missing)} (has {', '.join(sorted(tensors))}); "
                      "it is not a complete SAE: re-export it")


def layout_of(path: str) -> str | None:
  """The layout of the SAE directory `path` (a key of LAYOUTS), or None if it holds none."""
  for layout, files in LAYOUTS.items():
    if all(os.path.isfile(os.path.join(path, f)) for f in files):
      return layout
  return None


def is_sae_dir(path: str) -> bool:
  return layout_of(path) is not None


def load_sae(path: str, name: str | None = None) -> CanonicalSAE:
  """Reads one SAE directory of any layout (or `hf://` spec), canonicalises and validates it."""
  path = str(path).rstrip("/")
  if hub.is_hub(path):
    name = name or path
    path = hub.resolve(path)
  name = name or os.path.basename(path)
  if not os.path.isdir(path):
    raise JaxsaeError(f"{path} does not exist; pass a jaxsae run directory, SAE directories "
                      "or hf://OWNER/REPO[/SUBFOLDER]")
  layout = layout_of(path)
  if layout == "dictionary_learning":
    cfg_path = os.path.join(path, DL_CFG_FILE)
    parse = _from_dictionary_learning
  else:
    cfg_path = os.path.join(path, CFG_FILE)
    if os.path.isfile(os.path.join(path, DL_FILE)) and not os.path.isfile(cfg_path):
      raise JaxsaeError(f"{path} has {DL_FILE} but no {DL_CFG_FILE}; copy the {DL_CFG_FILE} "
                        "dictionary_learning wrote beside it (it names the dict_class)")
    if not os.path.isfile(cfg_path):
      raise JaxsaeError(f"{path} has no {CFG_FILE}; an SAE directory holds {CFG_FILE} and "
                        f"{SPARSIFY_FILE} (sparsify) or {SAELENS_FILE} (SAELens), or "
                        f"{DL_CFG_FILE} and {DL_FILE} (dictionary_learning)")
    if layout is None:
      raise JaxsaeError(f"{path} has {CFG_FILE} but neither {SPARSIFY_FILE} nor "
                        f"{SAELENS_FILE}; copy the weights file next to it")
    parse = _from_sparsify if layout == "sparsify" else _from_saelens
  cfg = _read_json(cfg_path)
  if not isinstance(cfg, dict) or not isinstance(cfg.get("jaxsae") or {}, dict):
    raise JaxsaeError(f"{cfg_path} is not a JSON object of settings; re-export the SAE")
  try:
    sae = parse(path, name, cfg)
    validate(sae)
  except (TypeError, ValueError, AttributeError, OverflowError) as e:  # e.g. k="4", k=Infinity
    raise JaxsaeError(f"{cfg_path} has a setting of the wrong type or value ({e}); fix it or "
                      "re-export the SAE")
  return sae


def _refuse(file: str, what: str) -> JaxsaeError:
  return JaxsaeError(f"{file}: {what}")


def _unknown_tensors(t: dict, known: set[str], file: str, arch: str) -> None:
  """A tensor no firing rule of jaxsae's reads would change the SAE's output unseen: refused."""
  extra = sorted(set(t) - known)
  if extra:
    raise _refuse(file, f"tensor{'s' if len(extra) > 1 else ''} {', '.join(extra)} "
                  f"{'are' if len(extra) > 1 else 'is'} not part of a {arch} SAE as jaxsae "
                  "encodes it; jaxsae does not read SAEs that need them")


def _from_sparsify(path: str, name: str, cfg: dict) -> CanonicalSAE:
  """sparsify's own files (its SparseCoder: TopK, or groupmax, optionally a transcoder or with a
  skip connection) and jaxsae's exports in that layout (cfg.json's "jaxsae" names the arch)."""
  from jaxsae.sae import READERS
  file = os.path.join(path, SPARSIFY_FILE)
  t = _read_tensors(file)
  _need(t, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), file)
  own = cfg.get("jaxsae") or {}
  cfg_file = os.path.join(path, CFG_FILE)
  activation = cfg.get("activation", "topk")
  if not own and activation not in ("topk", "groupmax"):
    raise _refuse(cfg_file, f"activation {activation!r}: jaxsae encodes sparsify's topk and "
                  "groupmax")
  if cfg.get("skip_connection") or "W_skip" in t:
    raise _refuse(cfg_file, "skip_connection: the SAE's output adds x W_skip, which jaxsae's "
                  "decoders do not; jaxsae does not read it")
  arch = _arch(own.get("arch", activation))
  n, k = t["W_dec"].shape[0], cfg.get("k", own.get("k"))
  if arch == "groupmax" and (not isinstance(k, int) or k <= 0 or n % k):
    raise _refuse(cfg_file, f"activation groupmax with k={k}: its {n} latents do not split "
                  "into k groups of equal size")
  known = {"encoder.weight", "encoder.bias", "W_dec", "b_dec", *READERS[arch].extra_tensors()}
  _unknown_tensors(t, known, file, arch)
  # A transcoder's encoder reads its input as it is (sparsify subtracts b_dec only from an
  # autoencoder's); its decoder writes another site's activations.
  transcode = bool(cfg.get("transcode"))
  return CanonicalSAE(name=name, path=path, layout="sparsify", arch=arch,
                      W_enc=t["encoder.weight"], b_enc=t["encoder.bias"], W_dec=t["W_dec"],
                      b_dec=t["b_dec"], k=None if k is None else int(k),
                      extras={key: v for key, v in t.items() if key not in
                              ("encoder.weight", "encoder.bias", "W_dec", "b_dec")}, cfg=cfg,
                      subtract_b_dec=bool(own.get("apply_b_dec_to_input", True))
                      and not transcode,
                      input_scale=float(own.get("input_scale", 1.0)), site=own.get("site"))


# SAELens's per-row input normalisations that jaxsae applies (sae_lens.SAE's
# run_time_activation_norm_fn_in, mirrored in `sae_input`).
INPUT_NORMS = ("none", "layer_norm", "constant_norm_rescale")
# The tensors each family's SAELens file holds beside W_enc, b_enc, W_dec and b_dec. Of its
# cfg.json, the fields that change how it encodes are each applied or refused in
# `_from_saelens`; the rest (hook and model metadata, dtype, device, training settings) do not.
_SAELENS_TENSORS = {"relu": set(), "topk": set(), "jumprelu": {"threshold"},
                    "gated": {"b_gate", "b_mag", "r_mag"}, "batchtopk": {"topk_threshold"}}
ACTIVATION_SCALER_FILE = "activation_scaler.json"  # SAELens's trainer-state scaling factor


def _from_saelens(path: str, name: str, cfg: dict) -> CanonicalSAE:
  """SAELens's files, inference SAEs (save_model / save_inference_model) and training
  checkpoints alike, encoded as `sae_lens.SAE.load_from_disk` (or, for a BatchTopK training
  checkpoint, its save_inference_model) encodes them."""
  file, cfg_file = os.path.join(path, SAELENS_FILE), os.path.join(path, CFG_FILE)
  t = _read_tensors(file)
  lens_arch = cfg.get("architecture", "standard")
  act = cfg.get("activation_fn_str") or cfg.get("activation_fn")
  if lens_arch == "standard" and act == "topk":  # older SAELens marked TopK by activation only
    lens_arch = "topk"
  elif lens_arch == "standard" and act not in (None, "relu"):
    raise _refuse(cfg_file, f"activation_fn {act!r}: jaxsae encodes SAELens's standard SAEs "
                  "with relu only")
  try:
    arch = _arch(lens_arch)
  except JaxsaeError:
    raise _refuse(cfg_file, f"architecture {lens_arch!r} is not one jaxsae encodes (it reads "
                  "SAELens's standard, topk, jumprelu, gated, batchtopk and "
                  "matryoshka_batchtopk)") from None
  if "log_threshold" in t and "threshold" not in t:  # as SAELens's JumpReLU loader converts
    t["threshold"] = np.exp(t.pop("log_threshold"))
  enc_bias = "b_gate" if arch == "gated" else "b_enc"
  _need(t, ("W_enc", enc_bias, "W_dec", "b_dec", *sorted(_SAELENS_TENSORS[arch] - {"b_gate"})),
        file)
  if "scaling_factor" in t and np.allclose(t["scaling_factor"], 1.0):
    del t["scaling_factor"]  # SAELens drops an all-ones one too
  if "scaling_factor" in t:
    raise _refuse(file, "scaling_factor (the finetuning scaling factor of early SAELens): "
                  "jaxsae does not read it; fold it into W_dec and save the SAE again")
  _unknown_tensors(t, {"W_enc", "b_enc", "W_dec", "b_dec", *_SAELENS_TENSORS[arch]}, file,
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
  if (arch == "jumprelu" and _family_or_none(own_arch) == "batchtopk"
      and np.unique(extras["threshold"]).size == 1):
    # jaxsae's own BatchTopK or Matryoshka export: the same rule, read back under its name.
    arch, extras = "batchtopk", {"threshold": extras["threshold"][0]}
  b_dec = t["b_dec"]
  norm_mode = cfg.get("normalize_activations") or "none"
  if norm_mode == "expected_average_only_in":
    # Folded as SAELens's fold_activation_norm_scaling_factor folds it at the end of training,
    # before the decoder norms below: with rescale_acts_by_decoder_norm the order sets the
    # codes' scale, and this is the order SAELens's final SAE has.
    s = np.float32(_saelens_scaling_factor(path, cfg_file))
    w_enc, w_dec, b_dec, norm_mode = w_enc * s, w_dec / s, b_dec / s, "none"
  if cfg.get("rescale_acts_by_decoder_norm"):
    # SAELens selects and fires on pre * |W_dec[i]| and decodes z / |W_dec[i]|: the same
    # codes as decoder rows of unit norm with the norms folded into the encoder.
    norm = np.maximum(np.linalg.norm(w_dec, axis=1), 1e-8)
    w_enc, b_enc, w_dec = w_enc * norm[:, None], b_enc * norm, w_dec / norm[:, None]
  if norm_mode not in INPUT_NORMS:
    raise _refuse(cfg_file, f"normalize_activations {norm_mode!r}: jaxsae applies "
                  f"{', '.join(INPUT_NORMS)} and expected_average_only_in; fold it into the "
                  "weights with SAELens (fold_activation_whitening) and save again")
  if cfg.get("reshape_activations", "none") not in ("none", "hook_z"):
    # hook_z only flattens heads, as the store's rows already are.
    raise _refuse(cfg_file, f"reshape_activations {cfg['reshape_activations']!r} is not one "
                  "jaxsae reads")
  if cfg.get("finetuning_scaling_factor"):
    raise _refuse(cfg_file, "finetuning_scaling_factor: jaxsae does not read it; fold it into "
                  "W_dec and save the SAE again")
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


def _saelens_scaling_factor(path: str, cfg_file: str) -> float:
  """The factor a SAELens checkpoint trained with expected_average_only_in scales its inputs
  by: its trainer folds it into the weights at the end, a checkpoint before keeps it beside."""
  scaler = os.path.join(path, ACTIVATION_SCALER_FILE)
  factor = _read_json(scaler).get("scaling_factor") if os.path.isfile(scaler) else None
  if factor is None:
    raise _refuse(cfg_file, "normalize_activations \"expected_average_only_in\" with no "
                  f"scaling_factor in {ACTIVATION_SCALER_FILE} beside it: the factor its "
                  "inputs were scaled by is unknown; fold it with SAELens "
                  "(fold_activation_norm_scaling_factor) and save again")
  return float(factor)


class _DlClass(NamedTuple):
  """Where one dictionary_learning class keeps the canonical weights in its state dict."""
  arch: str
  linear: bool  # nn.Linear encoder/decoder (encoder.weight [n, d], decoder.weight [d, n]),
  # else nn.Parameters W_enc [d, n], W_dec [n, d]
  b_enc: str
  b_dec: str
  extras: dict[str, str]  # canonical name -> state-dict key
  subtracts_b_dec: bool  # whether its encode sees x - b_dec
  # Its threshold as jaxsae's rule reads it: a scalar (saved as [1]), and where it fires on
  # ReLU(pre * 1[pre > theta]), that is where pre > max(theta, 0), floored at 0.
  scalar_threshold: bool = False
  threshold_floor: float | None = None


# Each class's `encode` is mirrored by the jaxsae module of its arch:
#   AutoEncoder             ReLU(encoder(x - bias))                    (the 2023 recipe)
#   AutoEncoderNew          ReLU(encoder(x))                           (the April 2024 update)
#   AutoEncoderTopK         TopK_k(ReLU(encoder(x - b_dec)))
#   BatchTopKSAE            ReLU(encoder(x - b_dec)), kept where > threshold (its inference rule)
#   MatryoshkaBatchTopKSAE  the same with W_enc/W_dec parameters; a loaded one has every group on
#   JumpReluAutoEncoder     ReLU(pre * 1[pre > threshold]), pre = x W_enc + b_enc
#                           (apply_b_dec_to_input, an attribute torch never saves, is False)
#   GatedAutoEncoder        1[encoder(x - decoder_bias) + gate_bias > 0]
#                           * ReLU(exp(r_mag) encoder(x - decoder_bias) + mag_bias)
_DL_CLASSES = {
    "AutoEncoder": _DlClass("relu", True, "encoder.bias", "bias", {}, True),
    "AutoEncoderNew": _DlClass("relu", True, "encoder.bias", "decoder.bias", {}, False),
    "AutoEncoderTopK": _DlClass("topk", True, "encoder.bias", "b_dec", {}, True),
    "BatchTopKSAE": _DlClass("batchtopk", True, "encoder.bias", "b_dec",
                             {"threshold": "threshold"}, True, scalar_threshold=True),
    "MatryoshkaBatchTopKSAE": _DlClass("batchtopk", False, "b_enc", "b_dec",
                                       {"threshold": "threshold"}, True, scalar_threshold=True),
    "JumpReluAutoEncoder": _DlClass("jumprelu", False, "b_enc", "b_dec",
                                    {"threshold": "threshold"}, False, threshold_floor=0.0),
    "GatedAutoEncoder": _DlClass("gated", True, "gate_bias", "decoder_bias",
                                 {"r_mag": "r_mag", "b_mag": "mag_bias"}, True),
}


def _read_state_dict(path: str) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError:
    raise JaxsaeError(f"reading {path} needs PyTorch (`pip install torch`): dictionary_learning "
                      "saves its SAEs with torch.save")
  try:
    # weights_only: an ae.pt is a pickle, and a pickle from the Hub must not run code.
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises its own types for truncated, foreign or unsafe pickles
    raise JaxsaeError(f"cannot read {path} ({type(e).__name__}: {str(e).splitlines()[0]}); it "
                      "is truncated or not a torch state dict: re-save it with "
                      "torch.save(ae.state_dict(), ...)")
  if isinstance(state, dict) and isinstance(state.get("ae"), dict):
    state = state["ae"]  # a training checkpoint {"ae": state_dict, "optimizer": ..., ...}
  if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
    raise JaxsaeError(f"{path} holds a {type(state).__name__}, not a state dict of tensors; "
                      "save the SAE with torch.save(ae.state_dict(), ...)")
  # torch.compile'd modules prefix their keys; the weights are the same.
  return {k.removeprefix("_orig_mod."): v.detach().float().numpy() for k, v in state.items()}


def _from_dictionary_learning(path: str, name: str, cfg: dict) -> CanonicalSAE:
  cfg_file, file = os.path.join(path, DL_CFG_FILE), os.path.join(path, DL_FILE)
  trainer = cfg.get("trainer")
  if not isinstance(trainer, dict) or "dict_class" not in trainer:
    raise JaxsaeError(f"{cfg_file} has no \"trainer\": {{\"dict_class\": ...}}; it is not the "
                      "config.json dictionary_learning writes beside ae.pt")
  dict_class = str(trainer["dict_class"])
  if dict_class not in _DL_CLASSES:
    raise JaxsaeError(f"{cfg_file}: dict_class {dict_class!r} is not one jaxsae reads; it reads "
                      f"{', '.join(_DL_CLASSES)}")
  c = _DL_CLASSES[dict_class]
  t = _read_state_dict(file)
  if dict_class == "AutoEncoder" and "bias" not in t and "decoder.bias" in t:
    # dictionary_learning's StandardTrainerAprilUpdate trains an AutoEncoderNew but records
    # dict_class "AutoEncoder"; the state dict's keys say which it is.
    c = _DL_CLASSES["AutoEncoderNew"]
  weights = ("encoder.weight", "decoder.weight") if c.linear else ("W_enc", "W_dec")
  _need(t, (*weights, c.b_enc, c.b_dec, *c.extras.values()), file)
  w_enc, w_dec = t[weights[0]], t[weights[1]]
  if c.linear:
    w_dec = w_dec.T  # decoder.weight is [d_in, n]
  else:
    w_enc = w_enc.T  # W_enc is [d_in, n]
  extras = {name: t[key] for name, key in c.extras.items()}
  if c.threshold_floor is not None:
    extras["threshold"] = np.maximum(extras["threshold"], c.threshold_floor)
  if c.scalar_threshold:
    extras["threshold"] = extras["threshold"].reshape(())
  k = None
  from jaxsae.sae import READERS
  if READERS[c.arch].encodes_with_k:
    k_file = int(t["k"].reshape(())) if "k" in t else None
    k_cfg = trainer.get("k")
    if k_file is not None and k_cfg is not None and int(k_cfg) != k_file:
      raise JaxsaeError(f"{path}: {DL_FILE} has k={k_file} but {DL_CFG_FILE} k={k_cfg}; they "
                        "come from different SAEs")
    k = k_file if k_file is not None else k_cfg
  elif "k" in t:
    k = int(t["k"].reshape(()))
  n, d = np.shape(w_dec) if np.ndim(w_dec) == 2 else (None, None)  # else validate() says so
  for key, want in (("dict_size", n), ("activation_dim", d)):
    if want is not None and trainer.get(key) not in (None, want):
      raise JaxsaeError(f"{path}: {DL_CFG_FILE} says {key}={trainer[key]}, the weights in "
                        f"{DL_FILE} have {want}; they come from different SAEs")
  return CanonicalSAE(name=name, path=path, layout="dictionary_learning", arch=_arch(c.arch),
                      W_enc=np.ascontiguousarray(w_enc), b_enc=t[c.b_enc],
                      W_dec=np.ascontiguousarray(w_dec), b_dec=t[c.b_dec],
                      k=None if k is None else int(k),
                      extras={key: np.asarray(v, np.float32) for key, v in extras.items()},
                      cfg=cfg, subtract_b_dec=c.subtracts_b_dec,
                      site=trainer.get("submodule_name"))


def validate(sae: CanonicalSAE) -> None:
  """Raises a JaxsaeError naming the file for inconsistent shapes or non-finite weights."""
  n, d = sae.W_dec.shape if sae.W_dec.ndim == 2 else (None, None)
  where = sae.path
  shapes = {"W_enc": (n, d), "b_enc": (n,), "W_dec": (n, d), "b_dec": (d,)}
  for key, want in shapes.items():
    got = getattr(sae, key).shape
    if n is None or got != want:
      raise JaxsaeError(f"{where}: {key} has shape {list(got)}, expected {list(want)} for "
                        f"{n} latents of d_in={d}; the weights file is inconsistent: re-export it")
  for key in ("W_enc", "b_enc", "W_dec", "b_dec", *sae.extras):
    arr = getattr(sae, key) if key in shapes else sae.extras[key]
    if not np.isfinite(arr).all():
      bad = int(np.count_nonzero(~np.isfinite(arr)))
      raise JaxsaeError(f"{where}: {key} holds {bad} NaN/Inf values; the SAE diverged in "
                        "training: retrain it (lower the learning rate) or drop this seed")
  cfg_n = sae.cfg.get("num_latents") or sae.cfg.get("d_sae")
  if cfg_n and int(cfg_n) != n:
    raise JaxsaeError(f"{where}: {CFG_FILE} says {cfg_n} latents, the weights have {n}; "
                      "the cfg and weights files come from different SAEs")
  if sae.cfg.get("d_in") not in (None, d):
    raise JaxsaeError(f"{where}: {CFG_FILE} says d_in={sae.cfg['d_in']}, the weights have "
                      f"d_in={d}; the cfg and weights files come from different SAEs")
  from jaxsae.sae import READERS
  reader = READERS[sae.arch]
  if reader.encodes_with_k and not sae.k:
    raise JaxsaeError(f"{where}: a {sae.arch} SAE without k in {CFG_FILE}; add \"k\": K there")
  missing = [f"`{name}`" for name in reader.extra_tensors() if name not in sae.extras]
  if missing:
    raise JaxsaeError(f"{where}: a {sae.arch} SAE without the {' and '.join(missing)} "
                      f"tensor{'s' if len(missing) > 1 else ''}; re-export it")


def _seed_of(dirname: str) -> tuple[int, int] | None:
  """(seed, data seed) of a run's member directory, seed{S} (data seed -1: the run's shared
  stream) or seed{S}_data{D} (a run with per-seed data orders), to sort them by both."""
  m = re.fullmatch(r"seed[_-]?(\d+)(?:_data(\d+))?", dirname)
  return (int(m.group(1)), int(m.group(2) or -1)) if m else None


def _natural(path: str) -> tuple:
  """Sort key in which layers.2 comes before layers.10."""
  return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path))


def _sae_dirs_under(root: str) -> list[str]:
  """Every SAE directory below `root` (not looking inside one), in natural order."""
  found = []
  for here, dirs, _ in os.walk(root):
    dirs[:] = [d for d in dirs if not d.startswith(".")]  # e.g. hf download's .cache/
    if here != root and is_sae_dir(here):
      found.append(here)
      dirs[:] = []
  return sorted(found, key=lambda p: _natural(os.path.relpath(p, root)))


def _expand(inp: str, shown: str) -> list[str]:
  """The SAE directories of one local input: itself, its seeds, or the SAE folders below it."""
  if is_sae_dir(inp):
    return [inp]
  seeds = sorted((s, d) for d in os.listdir(inp)
                 if (s := _seed_of(d)) is not None and os.path.isdir(os.path.join(inp, d)))
  if seeds:
    out = []
    for _, d in seeds:
      sub = os.path.join(inp, d)
      if not is_sae_dir(sub):
        raise JaxsaeError(f"{sub} lacks {CFG_FILE} or its weights; the run's export is "
                          "incomplete: rerun `jaxsae train` with the same --out to finish it")
      out.append(sub)
    return out
  found = _sae_dirs_under(inp)
  if not found:
    raise JaxsaeError(
        f"{shown} is neither an SAE directory ({CFG_FILE} + {SPARSIFY_FILE} or {SAELENS_FILE}, "
        f"or {DL_CFG_FILE} + {DL_FILE}) nor a directory of them (a run's seed*/ subdirectories, "
        "a release's one folder per SAE)")
  return found


def discover(inputs: Sequence[str]) -> list[str]:
  """SAE directories for `inputs`: run directories expand to their seeds, in seed order, other
  directories and hf:// repos to the SAE folders below them, in natural order."""
  if not inputs:
    raise JaxsaeError("no inputs; pass a jaxsae run directory or two or more SAE directories")
  out = []
  for inp in inputs:
    inp = str(inp).rstrip("/")
    if hub.is_hub(inp):
      out.extend(_expand(hub.resolve(inp), inp))
      continue
    if not os.path.isdir(inp):
      raise JaxsaeError(f"{inp} does not exist; pass a jaxsae run directory, SAE directories or "
                        "hf://OWNER/REPO[/SUBFOLDER]")
    out.extend(_expand(inp, inp))
  if len(set(map(os.path.realpath, out))) != len(out):
    raise JaxsaeError(f"the same SAE is given twice among {', '.join(out)}; list each once")
  return out


def _unique_names(paths: Sequence[str]) -> list[str]:
  """Short display names: the SAE's directory, prefixed by its parent when that is ambiguous,
  and named in full (with the Hub commit) when even that is. An SAE from the Hub cache is named
  by its repo and folder, not by the cache's snapshot path."""
  shown = [(hub.label(p) or p).removeprefix(hub.PREFIX) for p in paths]
  bare = [s.rsplit("@", 1)[0] if hub.label(p) else s for s, p in zip(shown, paths)]
  for names in ([os.path.basename(b) for b in bare],
                [os.path.join(os.path.basename(os.path.dirname(b)), os.path.basename(b))
                 for b in bare],
                bare, shown):
    if len(set(names)) == len(names):
      return names
  return [f"{i}:{s}" for i, s in enumerate(shown)]


def load_all(inputs: Sequence[str], same_width: bool = True) -> list[CanonicalSAE]:
  """Every SAE named by `inputs`, all of one d_in and, with `same_width`, one width (else a
  JaxsaeError naming the odd one)."""
  paths = discover(inputs)
  if len(paths) < 2:
    raise JaxsaeError(f"only one SAE found ({paths[0]}); matching needs two or more seeds")
  saes = [load_sae(p, n) for p, n in zip(paths, _unique_names(paths))]
  ref = saes[0]
  for s in saes[1:]:
    if s.d_in != ref.d_in or (same_width and s.n_latents != ref.n_latents):
      raise JaxsaeError(
          f"{s.path} has {s.n_latents} latents of d_in={s.d_in}, but {ref.path} has "
          f"{ref.n_latents} of d_in={ref.d_in}; only SAEs of the same "
          f"{'shape' if same_width else 'shape of input (d_in)'} can be matched")
  return saes


def find_store(inputs: Sequence[str], saes: Sequence[CanonicalSAE]) -> str | None:
  """The activation store the SAEs were trained on: a run's run.json, else an SAE's cfg.json."""
  for inp in inputs:
    path = os.path.join(str(inp), "run.json")
    if os.path.isfile(path):
      store = _read_json(path).get("store")
      if store:
        return str(store)
  for s in saes:
    if s.store:
      return str(s.store)
  return None


# ---------------------------------------------------------------------------------------------
# Encoding: through the architecture's own module, so a file is read with the firing rule the
# trainer used.


def module(sae: CanonicalSAE):
  """The `jaxsae.sae` module of `sae`'s architecture, holding its weights.

  ReLU SAEs of every recipe (jaxsae's relu_l1 variants, SAELens's standard) encode alike, by
  `ReluL1`; whether the encoder subtracts b_dec comes from the file.
  """
  from jaxsae import cpu_kernels
  from jaxsae import sae as sae_lib
  weights = {"W_enc": sae.W_enc.T, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec,
             **sae.extras}
  # Asked here, on the host, once per SAE: the modules' top-k probes nothing while traced.
  cfg = sae_lib.SaeConfig(k=sae.k or 1, cpu_kernels=cpu_kernels.available())
  m = sae_lib.READERS[sae.arch].from_weights(weights, cfg)
  m.subtracts_b_dec = sae.subtract_b_dec
  m.input_norm = sae.input_norm
  return m


def encoder(sae: CanonicalSAE):
  """(graphdef, state) of `module(sae)`: pass the state to jitted code as an argument (never
  close over it: a closed-over array is baked into the program as a constant), and run
  `encode(graphdef, state, x, sae.input_scale)` there."""
  from flax import nnx
  return nnx.split(module(sae))


def sae_input(m, x, input_scale):
  """What the module `m` encodes for raw store rows x [batch, d_in]: scaled by the trainer's
  input scale, then normalised per row as its file says (SAELens's
  run_time_activation_norm_fn_in, whose inverse maps a reconstruction back). Reconstructions,
  errors and variances are measured in this space: the SAE's own."""
  import jax.numpy as jnp
  x = x * input_scale
  if m.input_norm == "layer_norm":
    x = x - x.mean(-1, keepdims=True)
    return x / (jnp.std(x, -1, keepdims=True, ddof=1) + 1e-5)  # torch's std is unbiased
  if m.input_norm == "constant_norm_rescale":
    return x * (x.shape[-1] ** 0.5 / jnp.linalg.norm(x, axis=-1, keepdims=True))
  return x


def encode(graphdef, state, x, input_scale):
  """Latent activations [batch, n] of raw store rows x [batch, d_in]; pure, jittable (graphdef
  static, and with it the file's input normalisation). The trainer's input scale is applied
  here."""
  from flax import nnx
  m = nnx.merge(graphdef, state)
  return m.encode(sae_input(m, x, input_scale))

