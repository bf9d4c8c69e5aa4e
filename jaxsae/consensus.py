"""One SAE made of the features S seeds found: the consensus (and, at M = 1, the union).

  jaxsae consensus MATCH_DIR --min_seeds=M --out=DIR

Reads a `jaxsae match` directory (match.json names the SAEs; stability.csv holds every latent's
group across the seeds, see stability.py) and keeps the groups found in at least M of the S
seeds. Each kept group becomes one latent:

  W_enc row, b_enc   the members' mean (shared latents are aligned by the bijections already:
                     their cosines are >= the match's threshold, so no sign or order to fix)
  W_dec row          the mean of the members' unit rows, rescaled to their mean norm (unit for
                     the architectures that keep unit decoder rows)
  extras             per-latent ones (JumpReLU's thresholds, Gated's r_mag, b_mag) the members'
                     mean; scalars (BatchTopK's threshold) and b_dec the mean over all S SAEs
  k (TopK)           as many as fire per token among one seed's latents in the kept groups
                     (the sum of their firing frequencies in match's frequencies, the mean over
                     the seeds), so that a token activates as many features as in any one seed
                     (the union's k is the seeds' k); without frequencies, the seeds' k (at
                     most the width)

With M = 1 every group is kept: the union, each distinct feature once. DIR is an SAE directory
that `jaxsae match` (and so `jaxsae report`) reads: in sparsify's layout for TopK (cfg.json +
sae.safetensors, which sparsify's `SparseCoder.load_from_disk` reads) with SAELens's in
DIR/saelens/, in SAELens's for the architectures sparsify does not encode. Beside it,
stability.json (each consensus latent's group, the seeds it was found in, its members and their
decoder cosine to it) and consensus.json (what was printed: the width, FVU and L0 of the
consensus and of every seed on one token sample, and how many distinct features the seeds found
together, in widths of one SAE).

The token sample is the `--eval_tokens` tokens of the trainer's batch stream that follow the
match's own sample (frequencies, importance), so that k is not chosen on the tokens it is judged
on; `held_out` in consensus.json says whether the store was long enough for that.
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from jaxsae import files
from jaxsae import formats
from jaxsae import match as match_lib
from jaxsae import saes as saes_lib
from jaxsae import stability as stability_lib
from jaxsae.config import field
from jaxsae.errors import JaxsaeError

RESULT_FILE = "consensus.json"
GROUPS_FILE = "stability.json"  # per consensus latent; not stability.STABILITY_FILE (a match's csv)
SAELENS_DIR = "saelens"


@dataclasses.dataclass(frozen=True)
class ConsensusConfig:
  """Flags of `jaxsae consensus`."""
  inputs: tuple[str, ...] = field((), "the output directory of `jaxsae match`", positional=True)
  out: str = field("", "directory for the consensus SAE (cfg.json, sae.safetensors), "
                   "stability.json and consensus.json")
  min_seeds: int = field(2, "keep the features found in at least this many of the S seeds; 1 "
                         "gives the union of every distinct feature")
  store: str = field("", "activation store the FVU and L0 are measured on (default: the match's)")
  eval_tokens: int = field(65_536, "tokens the FVU and L0 of the consensus and of every seed are "
                           "measured on; 0: none")
  eval_batch: int = field(1024, "tokens per batch of that measurement")


def _check(cfg: ConsensusConfig) -> str:
  if len(cfg.inputs) != 1:
    raise JaxsaeError("pass exactly one MATCH_DIR: the --out of `jaxsae match`")
  if not cfg.out:
    raise JaxsaeError("--out is required: the directory for the consensus SAE")
  if cfg.eval_tokens < 0 or cfg.eval_batch < 1:
    raise JaxsaeError(f"--eval_tokens={cfg.eval_tokens} --eval_batch={cfg.eval_batch}: use 0 or "
                      "more tokens in batches of 1 or more")
  if os.path.isdir(cfg.out) and os.listdir(cfg.out) and not os.path.isfile(
      os.path.join(cfg.out, RESULT_FILE)):
    # The export replaces DIR whole: never a directory that holds something else.
    raise JaxsaeError(f"--out={cfg.out} exists and is not a consensus directory; pass a new "
                      "or empty directory")
  return cfg.inputs[0]


def read_match(match_dir: str) -> match_lib.MatchResult:
  """The match, which must carry stability.csv: the groups a consensus is made of."""
  found = match_lib.read(match_dir)
  if found.stability is None or "stability" not in found.summary:
    raise JaxsaeError(f"{match_dir} has no {stability_lib.STABILITY_FILE} (the match predates "
                      f"stability); rerun `jaxsae match ... --out={match_dir}`")
  return found


def load_members(summary: dict) -> list[formats.CanonicalSAE]:
  """The match's SAEs, read again from where match.json says they are; one firing rule."""
  members = []
  for s in summary["saes"]:
    if not files.is_remote(s["path"]) and not os.path.isdir(s["path"]):
      raise JaxsaeError(f"{s['path']} (SAE {s['name']} of the match) is gone; restore it or "
                        "rerun `jaxsae match` on where the SAEs are now")
    members.append(formats.load_sae(s["path"], s["name"]))
  first = members[0]
  for m in members:
    if m.input_norm != "none":  # a per-row normalisation no exported layout of jaxsae's holds
      raise JaxsaeError(f"{m.path} normalises each input row ({m.input_norm}); a consensus is "
                        "exported without it, so it would encode differently: leave this SAE out")
  for m in members[1:]:
    for what, a, b in (("architecture", m.arch, first.arch),
                       ("input scale", m.input_scale, first.input_scale),
                       ("apply_b_dec_to_input", m.subtract_b_dec, first.subtract_b_dec)):
      if a != b:
        raise JaxsaeError(f"{m.path} has {what} {a}, {first.path} {b}; a consensus averages "
                          "SAEs that encode alike: match SAEs of one architecture and input")
  return members


def membership(table, widths: list[int], min_seeds: int) -> tuple[np.ndarray, np.ndarray]:
  """(kept groups' ids, members [G, S]: each kept group's latent in every SAE, -1 where none),
  the groups found in the most seeds first, then by id (their first latent)."""
  size = table.groupby("group")["group_size"].first()
  kept = size[size >= min_seeds]
  order = np.lexsort((kept.index.values, -kept.values))
  ids = kept.index.values[order]
  pos = {g: r for r, g in enumerate(ids)}
  members = np.full((len(ids), len(widths)), -1, np.int64)
  sel = table[table.group.isin(pos)]
  members[sel.group.map(pos).values.astype(np.int64), sel.sae.values] = sel.latent.values
  return ids, members


def average(members: list[formats.CanonicalSAE], rows: np.ndarray) -> dict[str, np.ndarray]:
  """The consensus weights (save_sparsify's layout: W_enc [d_in, G]) of the groups `rows`
  ([G, S] latent per SAE, -1 none)."""
  has = rows >= 0
  count = has.sum(1)[:, None].astype(np.float64)

  def mean_of(get):
    total = 0.0
    for s, m in enumerate(members):
      v = get(m).astype(np.float64)[np.maximum(rows[:, s], 0)]
      total = total + np.where(has[:, s].reshape((-1,) + (1,) * (v.ndim - 1)), v, 0.0)
    return total / count.reshape((-1,) + (1,) * (np.ndim(total) - 1))

  norm = lambda w: np.linalg.norm(w, axis=1, keepdims=True)
  direction = mean_of(lambda m: m.W_dec / np.maximum(norm(m.W_dec), 1e-12))
  w_dec = direction / np.maximum(norm(direction), 1e-12) * mean_of(lambda m: norm(m.W_dec))
  params = {"W_enc": mean_of(lambda m: m.W_enc).T, "b_enc": mean_of(lambda m: m.b_enc),
            "W_dec": w_dec, "b_dec": np.mean([m.b_dec for m in members], 0)}
  n = members[0].n_latents
  for key, v in members[0].extras.items():
    per_latent = np.ndim(v) >= 1 and np.shape(v)[0] == n
    params[key] = (mean_of(lambda m, key=key: m.extras[key]) if per_latent
                   else np.mean([m.extras[key] for m in members], 0))
  return {k: np.ascontiguousarray(v, np.float32) for k, v in params.items()}


def choose_k(members: list[formats.CanonicalSAE], rows: np.ndarray, freqs) -> int | None:
  """k of a consensus that encodes by top-k: the kept features' expected firings per token."""
  from jaxsae.sae import READERS
  if not READERS[members[0].arch].encodes_with_k:
    return None
  width = len(rows)
  if freqs is None:
    return int(min(round(np.mean([m.k for m in members])), width))
  # Per seed, how many of its latents in the kept groups fire per token; their mean.
  expected = np.mean([freqs[s][rows[rows[:, s] >= 0, s]].sum() for s in range(len(members))])
  return int(np.clip(round(float(expected)), 1, width))


def export_cfg(members: list[formats.CanonicalSAE], k: int | None, summary: dict,
               match_dir: str, min_seeds: int) -> dict:
  """cfg.json's "jaxsae" of the consensus: how it encodes, and where it came from."""
  from jaxsae.sae import READERS
  reader, first = READERS[members[0].arch], members[0]
  # The family's reader names the architecture the writers know (relu -> relu_l1).
  cfg = {"arch": reader.name, "input_scale": first.input_scale,
         "apply_b_dec_to_input": first.subtract_b_dec,
         "normalize_decoder": reader.unit_norm_decoder,
         "store": summary.get("store"), "site": first.site,
         "consensus": {"match": os.path.abspath(match_dir), "min_seeds": min_seeds,
                       "num_seeds": len(members), "saes": [m.name for m in members]}}
  if k is not None:
    cfg["k"] = k
  return cfg


def write_sae(out: str, params: dict[str, np.ndarray], cfg: dict) -> None:
  """DIR in sparsify's layout and DIR/saelens/ in SAELens's where sparsify encodes the
  architecture (TopK), else DIR in SAELens's: DIR is one SAE directory either way."""
  if not formats.writes("sparsify", cfg["arch"]):  # also a family: a consensus of SAELens's ReLUs
    formats.saelens.write(out, params, cfg)
    return
  formats.sparsify.write(out, params, cfg)  # first: it replaces DIR whole
  formats.saelens.write(os.path.join(out, SAELENS_DIR), params, cfg)


def eval_sample(store, start_tokens: int, num_tokens: int, batch_size: int, site):
  """(x, take) batches: the `num_tokens` of the trainer's stream (data seed 0) after its first
  `start_tokens`; only the first `take` rows of the last batch belong to the sample."""
  first = -(-start_tokens // batch_size)
  for b in range(-(-num_tokens // batch_size)):
    yield (store.batch(first + b, batch_size, site=site),
           min(batch_size, num_tokens - b * batch_size))


def _sums(graphdef, state, scale, shift, x, valid):
  """One batch's squared error, active latents, and centred sums of the input, per SAE."""
  import jax.numpy as jnp
  from flax import nnx
  x_in = x * scale
  z = saes_lib.encode(graphdef, state, x, scale)
  w = valid[:, None].astype(jnp.float32)
  _, sums = match_lib.error_sums(nnx.merge(graphdef, state), x_in, z, shift, w)
  return {**sums, "l0": jnp.sum((z > 0) * w)}


def evaluate(saes: list[formats.CanonicalSAE], store, start_tokens: int, num_tokens: int,
             batch_size: int, site) -> list[dict]:
  """{"fvu", "l0"} of every SAE on `eval_sample`: the trainer's FVU (squared error over the
  sample's total variance, in the SAE's input scale) and mean active latents per token."""
  import jax
  step = jax.jit(_sums, static_argnums=0)
  encoders = [saes_lib.encoder(s) for s in saes]
  acc = [{"sse": 0.0, "l0": 0.0, "sx": 0.0, "sq": 0.0} for _ in saes]
  shift = None
  for x, take in eval_sample(store, start_tokens, num_tokens, batch_size, site):
    valid = np.arange(batch_size) < take
    if shift is None:  # centred on a first-batch mean: the variance is no difference of giants
      shift = x[:take].astype(np.float64).mean(0).astype(np.float32)
    for a, s, (graphdef, state) in zip(acc, saes, encoders):
      scale = np.float32(s.input_scale)
      out = step(graphdef, state, scale, scale * shift, x, valid)
      for key in a:
        a[key] = a[key] + np.asarray(out[key], np.float64)
  return [{"fvu": float(a["sse"] / match_lib.total_variance(a["sx"], a["sq"], num_tokens)),
           "l0": float(a["l0"] / num_tokens)} for a in acc]


def run(cfg: ConsensusConfig) -> dict:
  """Writes the consensus SAE of a match directory and measures it against every seed."""
  t0 = time.time()
  match_dir = _check(cfg)
  found = read_match(match_dir)
  summary, table, freqs = found.summary, found.stability, found.frequencies
  members = load_members(summary)
  widths = [m.n_latents for m in members]
  s_total = len(members)
  if not 1 <= cfg.min_seeds <= s_total:
    raise JaxsaeError(f"--min_seeds={cfg.min_seeds}: use 1 (the union) to {s_total} (features "
                      f"found in every one of the {s_total} seeds)")
  ids, rows = membership(table, widths, cfg.min_seeds)
  if not len(ids):
    raise JaxsaeError(f"no feature of {match_dir} is found in {cfg.min_seeds} of the {s_total} "
                      "seeds; lower --min_seeds")
  params = average(members, rows)
  k = choose_k(members, rows, freqs)
  export = export_cfg(members, k, summary, match_dir, cfg.min_seeds)
  write_sae(cfg.out, params, export)
  consensus = formats.load_sae(cfg.out, f"consensus{cfg.min_seeds}")
  files.atomic_write_json(os.path.join(cfg.out, GROUPS_FILE),
                          stability_json(members, table, ids, rows, consensus, cfg.min_seeds))

  st = summary["stability"]
  result = {"match": os.path.abspath(match_dir), "min_seeds": cfg.min_seeds,
            "num_seeds": s_total, "width": len(ids), "arch": consensus.arch, "k": k,
            "seed_widths": widths, "distinct_features": st["num_groups"],
            "distinct_per_width": st["distinct_per_width"],
            "groups_by_size": st["groups_by_size"], "conflicts": st["conflicts"],
            "groups_with_conflict": st["groups_with_conflict"]}
  result["eval"] = measure(cfg, summary, members, consensus)
  result["seconds"] = round(time.time() - t0, 2)
  files.atomic_write_json(os.path.join(cfg.out, RESULT_FILE), result)
  _say(result, cfg.out)
  return result


def stability_json(members, table, ids, rows, consensus, min_seeds: int) -> dict:
  """stability.json: per consensus latent, its group, seeds, members and their cosines."""
  unit = lambda w: w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
  dec = unit(consensus.W_dec)
  cos = np.full(rows.shape, np.nan)
  for s, m in enumerate(members):
    has = rows[:, s] >= 0
    cos[has, s] = np.sum(unit(m.W_dec[rows[has, s]]) * dec[has], 1)
  return {"min_seeds": min_seeds, "saes": [m.name for m in members],
          "group": ids.tolist(), "num_seeds": (rows >= 0).sum(1).tolist(),
          "members": rows.tolist(),
          "member_decoder_cos": [[None if np.isnan(c) else round(float(c), 6) for c in r]
                                 for r in cos]}


def measure(cfg: ConsensusConfig, summary: dict, members, consensus) -> dict | None:
  """FVU and L0 of the consensus and every seed on the tokens after the match's sample."""
  from jaxsae import store as store_lib
  path = cfg.store or summary.get("store")
  if cfg.eval_tokens == 0:
    return None
  if not path:
    raise JaxsaeError(f"--eval_tokens={cfg.eval_tokens} needs an activation store and the match "
                      "names none; pass --store=DIR or --eval_tokens=0")
  store = store_lib.Store(path, expect_d_in=consensus.d_in)
  # On the match's own store, past the tokens it measured (k's frequencies); another store
  # from its start.
  same = os.path.abspath(path) == os.path.abspath(summary.get("store") or "")
  start = max(summary.get(k, 0) for k in ("freq_tokens", "importance_tokens",
                                           "scan_tokens")) if same else 0
  tokens = min(cfg.eval_tokens, store.num_tokens)
  site = consensus.site if consensus.site in store.sites else None
  found = evaluate([consensus, *members], store, start, tokens, cfg.eval_batch, site)
  return {"store": path, "tokens": tokens, "after_tokens": start,
          "held_out": start + tokens <= store.num_tokens,
          "consensus": found[0],
          "seeds": [{"name": m.name, "width": m.n_latents, **f}
                    for m, f in zip(members, found[1:])]}


def _say(r: dict, out: str) -> None:
  print(f"jaxsae consensus: {r['width']:,} features found in >= {r['min_seeds']} of "
        f"{r['num_seeds']} seeds ({r['arch']}{', k=' + str(r['k']) if r['k'] else ''}) -> {out}")
  print(f"  distinct features the {r['num_seeds']} seeds found together: "
        f"{r['distinct_features']:,} = {r['distinct_per_width']:.2f} x one SAE's width "
        f"({'/'.join(map(str, sorted(set(r['seed_widths']))))}); {r['conflicts']} conflicting "
        f"edges refused, {r['groups_with_conflict']} groups touched")
  e = r["eval"]
  if e:
    seeds = e["seeds"]
    fvu, l0 = [s["fvu"] for s in seeds], [s["l0"] for s in seeds]
    note = "" if e["held_out"] else " (not held out: the match measured the whole store)"
    print(f"  on {e['tokens']:,} tokens{note}: consensus FVU {e['consensus']['fvu']:.4f}, L0 {e['consensus']['l0']:.1f}; seeds FVU "
          f"{np.mean(fvu):.4f} +- {np.std(fvu):.4f}, L0 {np.mean(l0):.1f}")
