"""dictionary_learning's layout (saprmarks), read: config.json + ae.pt (a torch state dict).

  per dict_class, e.g. AutoEncoderTopK: encoder.weight [n, d_in], encoder.bias [n],
  decoder.weight [d_in, n], b_dec [d_in], k []; JumpReluAutoEncoder: W_enc [d_in, n], ...

jaxsae writes no SAE in it. Of config.json's "trainer", applied: dict_class (and the state dict's
keys where dictionary_learning records one class for another), k (checked against ae.pt's),
submodule_name (the site); dict_size and activation_dim are checked against the weights; a
dict_class not below is refused. Each class's weights, and whether it subtracts b_dec, are in
`_CLASSES`.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

from jaxsae.errors import JaxsaeError
from jaxsae.formats import common
from jaxsae.formats.canonical import CanonicalSAE

CFG_FILE = "config.json"  # {"trainer": {"dict_class": ..., ...}, ...}
WEIGHTS_FILE = "ae.pt"
FILES = (CFG_FILE, WEIGHTS_FILE)


class _Class(NamedTuple):
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
_CLASSES = {
    "AutoEncoder": _Class("relu", True, "encoder.bias", "bias", {}, True),
    "AutoEncoderNew": _Class("relu", True, "encoder.bias", "decoder.bias", {}, False),
    "AutoEncoderTopK": _Class("topk", True, "encoder.bias", "b_dec", {}, True),
    "BatchTopKSAE": _Class("batchtopk", True, "encoder.bias", "b_dec",
                             {"threshold": "threshold"}, True, scalar_threshold=True),
    "MatryoshkaBatchTopKSAE": _Class("batchtopk", False, "b_enc", "b_dec",
                                       {"threshold": "threshold"}, True, scalar_threshold=True),
    "JumpReluAutoEncoder": _Class("jumprelu", False, "b_enc", "b_dec",
                                    {"threshold": "threshold"}, False, threshold_floor=0.0),
    "GatedAutoEncoder": _Class("gated", True, "gate_bias", "decoder_bias",
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


def read(path: str, name: str, cfg: dict) -> CanonicalSAE:
  """dictionary_learning's ae.pt and config.json, encoded as its class's `encode`."""
  cfg_file, file = os.path.join(path, CFG_FILE), os.path.join(path, WEIGHTS_FILE)
  trainer = cfg.get("trainer")
  if not isinstance(trainer, dict) or "dict_class" not in trainer:
    raise JaxsaeError(f"{cfg_file} has no \"trainer\": {{\"dict_class\": ...}}; it is not the "
                      "config.json dictionary_learning writes beside ae.pt")
  dict_class = str(trainer["dict_class"])
  if dict_class not in _CLASSES:
    raise JaxsaeError(f"{cfg_file}: dict_class {dict_class!r} is not one jaxsae reads; it reads "
                      f"{', '.join(_CLASSES)}")
  c = _CLASSES[dict_class]
  t = _read_state_dict(file)
  if dict_class == "AutoEncoder" and "bias" not in t and "decoder.bias" in t:
    # dictionary_learning's StandardTrainerAprilUpdate trains an AutoEncoderNew but records
    # dict_class "AutoEncoder"; the state dict's keys say which it is.
    c = _CLASSES["AutoEncoderNew"]
  weights = ("encoder.weight", "decoder.weight") if c.linear else ("W_enc", "W_dec")
  common.need(t, (*weights, c.b_enc, c.b_dec, *c.extras.values()), file)
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
      raise JaxsaeError(f"{path}: {WEIGHTS_FILE} has k={k_file} but {CFG_FILE} k={k_cfg}; they "
                        "come from different SAEs")
    k = k_file if k_file is not None else k_cfg
  elif "k" in t:
    k = int(t["k"].reshape(()))
  n, d = np.shape(w_dec) if np.ndim(w_dec) == 2 else (None, None)  # else validate() says so
  for key, want in (("dict_size", n), ("activation_dim", d)):
    if want is not None and trainer.get(key) not in (None, want):
      raise JaxsaeError(f"{path}: {CFG_FILE} says {key}={trainer[key]}, the weights in "
                        f"{WEIGHTS_FILE} have {want}; they come from different SAEs")
  return CanonicalSAE(name=name, path=path, layout="dictionary_learning", arch=common.family(c.arch),
                      W_enc=np.ascontiguousarray(w_enc), b_enc=t[c.b_enc],
                      W_dec=np.ascontiguousarray(w_dec), b_dec=t[c.b_dec],
                      k=None if k is None else int(k),
                      extras={key: np.asarray(v, np.float32) for key, v in extras.items()},
                      cfg=cfg, subtract_b_dec=c.subtracts_b_dec,
                      site=trainer.get("submodule_name"))
