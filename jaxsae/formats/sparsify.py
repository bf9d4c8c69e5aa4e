"""EleutherAI sparsify's layout, read and written: cfg.json + sae.safetensors.

  encoder.weight [n, d_in] (= W_enc.T), encoder.bias [n], W_dec [n, d_in], b_dec [d_in]

Written only for an architecture with a `sparsify_activation` (sparsify's SparseCoder encodes
TopK; its other activation, groupmax, is not one jaxsae trains). Read: sparsify's own SAEs (TopK
or groupmax) and jaxsae's exports in this layout, whose cfg.json "jaxsae" names the arch.

Of cfg.json, applied: activation, k, transcode (its encoder reads the input as it is), and
jaxsae's arch, k, apply_b_dec_to_input, input_scale and site; refused: skip_connection (and a
W_skip tensor), any activation but topk and groupmax, a groupmax k that does not divide the
latents, and every tensor the architecture does not read. The rest (expansion_factor,
normalize_decoder, multi_topk, num_latents and d_in, checked against the weights) do not change
how it encodes.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from jaxsae.formats import common
from jaxsae.formats.canonical import CanonicalSAE
from jaxsae.formats.common import CFG_FILE, SHARED

WEIGHTS_FILE = "sae.safetensors"
FILES = (CFG_FILE, WEIGHTS_FILE)
_TENSORS = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")


def read(path: str, name: str, cfg: dict) -> CanonicalSAE:
  """sparsify's own files (its SparseCoder: TopK, or groupmax, optionally a transcoder or with a
  skip connection) and jaxsae's exports in that layout (cfg.json's "jaxsae" names the arch)."""
  from jaxsae.sae import READERS
  file = os.path.join(path, WEIGHTS_FILE)
  t = common.read_tensors(file)
  common.need(t, _TENSORS, file)
  own = cfg.get("jaxsae") or {}
  cfg_file = os.path.join(path, CFG_FILE)
  activation = cfg.get("activation", "topk")
  if not own and activation not in ("topk", "groupmax"):
    raise common.refuse(cfg_file, f"activation {activation!r}: jaxsae encodes sparsify's topk "
                        "and groupmax")
  if cfg.get("skip_connection") or "W_skip" in t:
    raise common.refuse(cfg_file, "skip_connection: the SAE's output adds x W_skip, which "
                        "jaxsae's decoders do not; jaxsae does not read it")
  arch = common.family(own.get("arch", activation))
  n, k = t["W_dec"].shape[0], cfg.get("k", own.get("k"))
  if arch == "groupmax" and (not isinstance(k, int) or k <= 0 or n % k):
    raise common.refuse(cfg_file, f"activation groupmax with k={k}: its {n} latents do not "
                        "split into k groups of equal size")
  known = {*_TENSORS, *READERS[arch].extra_tensors()}
  common.unknown_tensors(t, known, file, arch)
  # A transcoder's encoder reads its input as it is (sparsify subtracts b_dec only from an
  # autoencoder's); its decoder writes another site's activations.
  transcode = bool(cfg.get("transcode"))
  return CanonicalSAE(name=name, path=path, layout="sparsify", arch=arch,
                      W_enc=t["encoder.weight"], b_enc=t["encoder.bias"], W_dec=t["W_dec"],
                      b_dec=t["b_dec"], k=None if k is None else int(k),
                      extras={key: v for key, v in t.items() if key not in _TENSORS}, cfg=cfg,
                      subtract_b_dec=bool(own.get("apply_b_dec_to_input", True))
                      and not transcode,
                      input_scale=float(own.get("input_scale", 1.0)), site=own.get("site"))


def write(directory: str, params: dict[str, np.ndarray], cfg: dict[str, Any]) -> None:
  """Writes `directory` atomically in sparsify's layout: readers see the old export or the new
  one, never half.

  Args:
    directory: the SAE's folder, e.g. RUN/seed0.
    params: W_enc [d_in, n], b_enc [n], W_dec [n, d_in], b_dec [d_in] and any extras, as the
      trainer holds them (in its input scale, folded into the weights here).
    cfg: jaxsae's description (arch, seed, k, input_scale, ...), stored under "jaxsae"; "k"
      and "normalize_decoder" also fill sparsify's fields.
  """
  cls = common.arch_class(cfg)
  if cls.sparsify_activation is None:
    raise ValueError(f"sparsify cannot encode a {cls.name} SAE (it encodes TopK only); write "
                     "it in SAELens's layout")
  p = common.fold_input_scale(params, float(cfg.get("input_scale", 1.0)))
  d_in, n = common.check_shapes(p)
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
      "jaxsae": common.own(cfg),
  }
  common.write_dir(directory, WEIGHTS_FILE, tensors, sparsify_cfg)


def writes(arch_cls) -> bool:
  """Whether sparsify encodes an SAE of the architecture class `arch_cls` as jaxsae does."""
  return arch_cls.sparsify_activation is not None


def stored(directory: str) -> dict[str, np.ndarray]:
  """The params `write` stored, in jaxsae's names (input scale folded): W_enc [d_in, n], ..."""
  t = common.read_tensors(os.path.join(directory, WEIGHTS_FILE))
  return {"W_enc": t.pop("encoder.weight").T, "b_enc": t.pop("encoder.bias"),
          "W_dec": t.pop("W_dec"), "b_dec": t.pop("b_dec"), **t}
