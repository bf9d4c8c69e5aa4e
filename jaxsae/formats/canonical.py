"""The canonical SAE every layout is read into: encoder AND decoder are `[n_latents, d_in]`, one
row per latent.

Normalising a SAELens `W_enc` along its stored last axis would normalise across latents instead
of within one, a mistake made in the paper's own notebook; canonicalising on load rules it out.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxsae.errors import JaxsaeError
from jaxsae.formats.common import CFG_FILE


@dataclasses.dataclass(frozen=True)
class CanonicalSAE:
  """One SAE in canonical layout: every weight matrix is [n_latents, d_in]."""
  name: str
  path: str
  layout: str  # a key of jaxsae.formats.LAYOUTS
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
  input_norm: str = "none"  # a per-row normalisation before encoding (saelens.INPUT_NORMS)

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
