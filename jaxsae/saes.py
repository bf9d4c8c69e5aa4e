"""The SAEs a match reads: the SAE directories its inputs name, loaded, checked to be alike, and
encoded by their architecture's own module.

A jaxsae training run is a directory of `seed{N}/` SAE directories and `run.json`; any other
directory of SAE folders (a downloaded release, dictionary_learning's `trainer_{N}/`) expands to
each of them. `hf://OWNER/REPO[/SUBFOLDER][@REVISION]` names SAEs on the Hugging Face Hub
(`jaxsae.hub`), read from its local cache. Each file is read by its library's module in
`jaxsae.formats`.
"""

from __future__ import annotations

import os
import re
from typing import Sequence

from jaxsae import hub
from jaxsae.errors import JaxsaeError
from jaxsae.formats import CFG_FILE, dictionary_learning, is_sae_dir, load_sae, saelens, sparsify
from jaxsae.formats.canonical import CanonicalSAE
from jaxsae.formats.common import read_json

# The weights files by the names tests/conftest.py writes SAEs with.
SPARSIFY_FILE, SAELENS_FILE = sparsify.WEIGHTS_FILE, saelens.WEIGHTS_FILE


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
        f"or {dictionary_learning.CFG_FILE} + {dictionary_learning.WEIGHTS_FILE}) nor a directory of them (a run's seed*/ subdirectories, "
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
      store = read_json(path).get("store")
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

