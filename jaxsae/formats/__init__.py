"""SAE files of other libraries, one module each, reading and writing its layout:

  sparsify (EleutherAI; jaxsae's TopK export)  cfg.json + sae.safetensors          read, written
  saelens (jaxsae's export of the others)      cfg.json + sae_weights.safetensors  read, written
  dictionary_learning (saprmarks)              config.json + ae.pt                 read

Each module says which of its library's fields it applies and which it refuses: every field of
a file that changes how it encodes is one or the other (README, "SAEs in other libraries").
Reading gives a `canonical.CanonicalSAE`; writing takes jaxsae's params (W_enc [d_in, n]) and
description, and writes a layout only where its library encodes the SAE exactly as jaxsae does,
with the trainer's input scale folded into the weights (cfg.json records it as
"input_scale_folded"; both cfg.json files carry jaxsae's description under "jaxsae").
`hf://OWNER/REPO[/SUBFOLDER][@REVISION]` names an SAE on the Hugging Face Hub (`jaxsae.hub`).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np

from jaxsae import hub
from jaxsae.errors import JaxsaeError
from jaxsae.formats import common, dictionary_learning, saelens, sparsify
from jaxsae.formats.canonical import CanonicalSAE, validate
from jaxsae.formats.common import CFG_FILE

# Each layout's module, in the order a directory's files are tried.
LAYOUTS = {"sparsify": sparsify, "saelens": saelens, "dictionary_learning": dictionary_learning}
# The layouts jaxsae writes (`jaxsae train --layouts`).
WRITERS: dict[str, Callable[[str, dict, dict], None]] = {"sparsify": sparsify.write,
                                                         "saelens": saelens.write}


def writes(layout: str, arch: str) -> bool:
  """Whether `layout` can hold an SAE of architecture `arch` so that its library encodes it as
  jaxsae does."""
  return LAYOUTS[layout].writes(common.arch_class({"arch": arch}))


def layout_of(path: str) -> str | None:
  """The layout of the SAE directory `path` (a key of LAYOUTS), or None if it holds none."""
  for layout, module in LAYOUTS.items():
    if all(os.path.isfile(os.path.join(path, f)) for f in module.FILES):
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
  dl = dictionary_learning
  if layout == "dictionary_learning":
    cfg_path = os.path.join(path, dl.CFG_FILE)
  else:
    cfg_path = os.path.join(path, CFG_FILE)
    if os.path.isfile(os.path.join(path, dl.WEIGHTS_FILE)) and not os.path.isfile(cfg_path):
      raise JaxsaeError(f"{path} has {dl.WEIGHTS_FILE} but no {dl.CFG_FILE}; copy the "
                        f"{dl.CFG_FILE} dictionary_learning wrote beside it (it names the "
                        "dict_class)")
    if not os.path.isfile(cfg_path):
      raise JaxsaeError(f"{path} has no {CFG_FILE}; an SAE directory holds {CFG_FILE} and "
                        f"{sparsify.WEIGHTS_FILE} (sparsify) or {saelens.WEIGHTS_FILE} "
                        f"(SAELens), or {dl.CFG_FILE} and {dl.WEIGHTS_FILE} "
                        "(dictionary_learning)")
    if layout is None:
      raise JaxsaeError(f"{path} has {CFG_FILE} but neither {sparsify.WEIGHTS_FILE} nor "
                        f"{saelens.WEIGHTS_FILE}; copy the weights file next to it")
  cfg = common.read_json(cfg_path)
  if not isinstance(cfg, dict) or not isinstance(cfg.get("jaxsae") or {}, dict):
    raise JaxsaeError(f"{cfg_path} is not a JSON object of settings; re-export the SAE")
  try:
    sae = LAYOUTS[layout].read(path, name, cfg)
    validate(sae)
  except (TypeError, ValueError, AttributeError, OverflowError) as e:  # e.g. k="4", k=Infinity
    raise JaxsaeError(f"{cfg_path} has a setting of the wrong type or value ({e}); fix it or "
                      "re-export the SAE")
  return sae


def stored(directory: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(params in jaxsae's names, cfg.json) of an SAE jaxsae wrote, as stored (input scale
  folded): W_enc [d_in, n], b_enc, W_dec, b_dec and the extras. For comparing exports; matching
  reads SAEs with `load_sae`."""
  layout = layout_of(directory)
  if layout not in WRITERS:
    raise JaxsaeError(f"{directory} holds no SAE that jaxsae writes (sparsify's or SAELens's "
                      "layout)")
  return LAYOUTS[layout].stored(directory), common.read_json(os.path.join(directory, CFG_FILE))
