"""First-letter feature absorption (Chanin et al., "A is for Absorption", arXiv 2409.14507), as
SAEBench's absorption evaluation computes it, offline on any model `jaxsae extract` loads.

The steps, each a function below, with SAEBench's settings:

  1. prompts    every token of the tokenizer's vocabulary that decodes to letters only (a
                leading space allowed) is a word; its prompt is 10 other words as in-context
                examples, "{word} has the first letter: W" joined by newlines, then
                "{word} has the first letter:". The activation read is the word token's.
                Words split 80/20 into train and test (seeded).
  2. probe      a 26-way one-vs-rest logistic probe on the model's activations at the SAE's
                site (BCE with positive weights neg/pos per letter, Adam at 1e-2 decaying to
                1e-5, weight decay 1e-4); its test F1 per letter is reported, and a letter
                counts only where it exceeds 0.6
  3. k-sparse   an L1-penalised (0.01) one-vs-rest probe on the SAE's latents ranks each
                letter's latents; for k = 1..10 a class-balanced logistic regression (L2, C = 1,
                as sklearn's default) on the top k; the letter's main latents are the top k
                while the test F1 keeps rising by more than 0.03 per k (feature splitting)
  4. absorption on the test words whose probe fires for their own letter: per word, the
                absorption fraction (the part of the probe projection that up to 3 latents
                other than the main ones, at probe cosine >= 0.1, account for, when they
                account for >= 40% of it) and full absorption (no main latent fires, and the
                one latent projecting most on the probe, at cosine >= 0.025, carries >= 40%)

Two departures, both for speed on a CPU: the probes train full-batch in JAX rather than in
minibatches in torch (each is convex, so the optimum is the same up to the step count); and
step 4 reuses the test prompts' activations instead of building new prompts for the same words
with other in-context examples.
"""

from __future__ import annotations

import dataclasses
import string

import numpy as np

LETTERS = string.ascii_lowercase
TEMPLATE = "{word} has the first letter:"
EPS = 1e-8
MIN_PROBE_F1 = 0.6
MIN_LETTERS = 20  # SAEBench refuses to score a model with fewer letters above MIN_PROBE_F1
MAX_K = 10
F1_JUMP = 0.03
FULL_COS = 0.025  # the top latent's probe cosine, for full absorption
FRACTION_COS = 0.1  # each absorbing latent's probe cosine, for the absorption fraction
PROPORTION = 0.4  # the share of the probe projection absorbing latents must carry
MAX_ABSORBERS = 3
TOP_FEATS = 10


# ---------------------------------------------------------------------------------------------
# 1. Words and prompts.


def alpha_tokens(tokenizer) -> list[tuple[int, str]]:
  """(token id, decoded word) of every vocabulary token made of ASCII letters only (after one
  optional leading space), in id order."""
  out = []
  allowed = set(string.ascii_letters)
  for tid in sorted(tokenizer.get_vocab().values()):
    word = tokenizer.decode([tid])
    bare = word[1:] if word.startswith(" ") else word
    if bare and set(bare) <= allowed:
      out.append((tid, word))
  return out


def letter_of(word: str) -> int:
  return LETTERS.index(word.strip()[0].lower())


def icl_prompt(word: str, examples: list[str], template: str = TEMPLATE) -> str:
  lines = [template.format(word=w) + " " + w.strip()[0].upper() for w in examples]
  return "\n".join(lines + [template.format(word=word)])


def prompts(words: list[str], rng: np.random.Generator, num_examples: int = 10,
            pool: list[str] | None = None) -> list[str]:
  """One prompt per word, its examples drawn from `pool` (default `words`) without the word."""
  pool = words if pool is None else pool
  out = []
  for w in words:
    while True:
      ex = [pool[i] for i in rng.choice(len(pool), num_examples, replace=False)]
      if w not in ex:
        break
    out.append(icl_prompt(w, ex))
  return out


@dataclasses.dataclass(frozen=True)
class ProbeData:
  """Activations at the word token of every prompt, at each site, and what they are."""
  words: list[str]
  token_ids: np.ndarray  # [m]
  labels: np.ndarray  # [m] letter index
  acts: dict[str, np.ndarray]  # site -> [m, d]
  train: np.ndarray  # [m] bool: the word is in the probe's training split

  def split(self, site: str, train: bool) -> tuple[np.ndarray, np.ndarray]:
    sel = self.train if train else ~self.train
    return self.acts[site][sel], self.labels[sel]


def collect(model, tokenizer, sites: list[str], *, max_words: int = 0, seed: int = 0,
            batch_size: int = 32, progress: bool = True) -> ProbeData:
  """Runs the model on every word's prompt (SAEBench's train/test split of the vocabulary, each
  split's examples drawn from its own words) and keeps the word token's activations."""
  import torch
  from tqdm import tqdm
  from jaxsae import extract
  rng = np.random.default_rng(seed)
  vocab = alpha_tokens(tokenizer)
  order = rng.permutation(len(vocab))
  if max_words:
    order = order[:max_words]
  vocab = [vocab[i] for i in order]
  cut = int(0.8 * len(vocab))
  words = [w for _, w in vocab]
  texts = prompts(words[:cut], rng) + prompts(words[cut:], rng)
  suffix = len(tokenizer(TEMPLATE.format(word=""), add_special_tokens=False)["input_ids"])
  bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
  hooked = extract.Hooked(model, extract.resolve_sites(model, sites))
  keep, rows = [], {s: [] for s in sites}
  try:
    for lo in tqdm(range(0, len(texts), batch_size), desc="absorption prompts",
                   disable=not progress):
      enc = [bos + tokenizer(t, add_special_tokens=False)["input_ids"]
             for t in texts[lo:lo + batch_size]]
      width = max(map(len, enc))
      # Right padding: a causal model's earlier positions never see the pad.
      ids = torch.tensor([e + [0] * (width - len(e)) for e in enc])
      pos = np.array([len(e) - suffix - 1 for e in enc])
      out = hooked(ids).float().numpy()  # [batch, ctx, n_sites, d]
      for j, (e, p) in enumerate(zip(enc, pos)):
        i = lo + j
        # The word must be its own token where the template says (SAEBench's fixed position).
        if e[p] != vocab[i][0]:
          continue
        keep.append(i)
        for s_i, s in enumerate(sites):
          rows[s].append(out[j, p, s_i])
  finally:
    hooked.close()
  keep = np.array(keep)
  return ProbeData(words=[words[i] for i in keep],
                   token_ids=np.array([vocab[i][0] for i in keep]),
                   labels=np.array([letter_of(words[i]) for i in keep]),
                   acts={s: np.stack(rows[s]).astype(np.float32) for s in sites},
                   train=keep < cut)


# ---------------------------------------------------------------------------------------------
# 2. and 3. Probes.


def train_probe(x: np.ndarray, y: np.ndarray, *, num_classes: int = 26, steps: int = 300,
                lr: float = 1e-2, end_lr: float = 1e-5, weight_decay: float = 1e-4,
                l1: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
  """One-vs-rest logistic probes (W [classes, d], b [classes]) as SAEBench's train_multi_probe:
  BCE with each class's positives weighted neg/pos, Adam with coupled weight decay, an
  exponentially decaying rate, and an optional L1 penalty (mean over probes of sum |w|)."""
  import jax
  import jax.numpy as jnp
  import optax
  x = jnp.asarray(x, jnp.float32)
  onehot = jax.nn.one_hot(jnp.asarray(y), num_classes)
  pos = onehot.sum(0)
  pos_weight = (len(y) - pos) / jnp.maximum(pos, 1)
  opt = optax.chain(optax.add_decayed_weights(weight_decay),
                    optax.adam(optax.exponential_decay(lr, steps, end_lr / lr)))

  def loss(p):
    z = x @ p["w"].T + p["b"]
    bce = -(pos_weight * onehot * jax.nn.log_sigmoid(z) + (1 - onehot) * jax.nn.log_sigmoid(-z))
    return bce.mean() + l1 * jnp.abs(p["w"]).sum(axis=1).mean()

  def step(carry, _):
    p, s = carry
    g = jax.grad(loss)(p)
    u, s = opt.update(g, s, p)
    return (optax.apply_updates(p, u), s), None

  p = {"w": jnp.zeros((num_classes, x.shape[1])), "b": jnp.zeros(num_classes)}
  (p, _), _ = jax.jit(lambda p: jax.lax.scan(step, (p, opt.init(p)), None, length=steps))(p)
  return np.asarray(p["w"]), np.asarray(p["b"])


def f1_score(pred: np.ndarray, true: np.ndarray) -> float:
  tp = float((pred & true).sum())
  denom = float(pred.sum() + true.sum())
  return 2 * tp / denom if denom else 0.0


def fit_balanced_logistic(x: np.ndarray, y: np.ndarray, c: float = 1.0,
                          iters: int = 50) -> tuple[np.ndarray, float]:
  """sklearn's LogisticRegression(class_weight="balanced") optimum, by damped Newton steps:
  minimises ||w||^2 / 2 + C sum_i s_i logloss_i, s_i = n / (2 n_class(i)), bias unpenalised."""
  n, k = x.shape
  n_pos = max(int(y.sum()), 1)
  s = np.where(y, n / (2 * n_pos), n / (2 * max(n - n_pos, 1))) * c
  x1 = np.hstack([x, np.ones((n, 1))]).astype(np.float64)
  reg = np.r_[np.ones(k), 0.0]
  theta = np.zeros(k + 1)

  def objective(t):
    z = x1 @ t
    return 0.5 * (reg * t * t).sum() + (s * (np.logaddexp(0, z) - y * z)).sum()

  f = objective(theta)
  for _ in range(iters):
    z = x1 @ theta
    sig = 1 / (1 + np.exp(-z))
    grad = x1.T @ (s * (sig - y)) + reg * theta
    h = (x1 * (s * sig * (1 - sig))[:, None]).T @ x1 + np.diag(reg + 1e-9)
    delta = np.linalg.solve(h, grad)
    t = 1.0
    while t > 1e-4 and objective(theta - t * delta) > f:
      t /= 2
    if t <= 1e-4:
      break
    theta = theta - t * delta
    f_new = objective(theta)
    if f - f_new < 1e-10 * max(1.0, abs(f)):
      f = f_new
      break
    f = f_new
  return theta[:k], float(theta[k])


def main_latents(z_train: np.ndarray, y_train: np.ndarray, z_test: np.ndarray,
                 y_test: np.ndarray, ranking: np.ndarray, max_k: int = MAX_K,
                 jump: float = F1_JUMP) -> tuple[list[list[int]], np.ndarray]:
  """Each letter's main latents and the test F1 of its k-sparse probes, k = 1..max_k.

  `ranking` [26, n] are the L1 probe's weights on the latents; a letter's top-k latents are
  its k largest (not largest in magnitude: only latents that predict the letter directly).
  """
  f1 = np.zeros((len(LETTERS), max_k))
  mains = []
  for letter in range(len(LETTERS)):
    order = np.argsort(-ranking[letter], kind="stable")[:max_k]
    best, chosen = -100.0, []
    for k in range(1, max_k + 1):
      feats = order[:k]
      w, b = fit_balanced_logistic(z_train[:, feats], y_train == letter)
      f1[letter, k - 1] = f1_score(z_test[:, feats] @ w + b > 0, y_test == letter)
    for k in range(1, max_k + 1):  # SAEBench's feature-splitting rule
      if f1[letter, k - 1] > best + jump:
        best, chosen = f1[letter, k - 1], order[:k].tolist()
      else:
        break
    mains.append(chosen)
  return mains, f1


# ---------------------------------------------------------------------------------------------
# 4. Absorption per word.


def absorption_scores(x: np.ndarray, z: np.ndarray, probe_dir: np.ndarray, w_dec: np.ndarray,
                      main: list[int]) -> dict[str, np.ndarray]:
  """Per word (rows of x [m, d], its latents z [m, n]): absorption fraction, full absorption,
  and which latents absorbed (the up-to-3 counted in the fraction; -1 padding).

  SAEBench's FeatureAbsorptionCalculator: a latent's projection on the probe is its
  activation times its decoder row's cosine with the (unit) probe direction.
  """
  p = probe_dir / np.linalg.norm(probe_dir)
  cos = (w_dec @ p) / np.maximum(np.linalg.norm(w_dec, axis=1), EPS)
  proj = z * cos  # [m, n]
  act_proj = x @ p
  main = np.asarray(main, np.int64)
  main_proj = proj[:, main].sum(axis=1)
  cand = np.ones(z.shape[1], bool)
  cand[main] = False
  cand &= cos >= FRACTION_COS
  m = len(x)
  fraction = np.zeros(m)
  full = np.zeros(m, bool)
  absorbers = np.full((m, MAX_ABSORBERS), -1, np.int64)
  for i in range(m):
    ok = cand & (proj[i] > 0)
    ids = np.nonzero(ok)[0]
    top = ids[np.argsort(-proj[i, ids], kind="stable")[:MAX_ABSORBERS]]
    total = float(proj[i, top].sum())
    share = total / act_proj[i] if act_proj[i] != 0 else 0.0
    if main_proj[i] >= act_proj[i] or share < PROPORTION:
      fraction[i] = 0.0
    elif main_proj[i] <= 0:
      fraction[i] = 1.0
    else:
      absorbed = min(total, act_proj[i] - main_proj[i])
      fraction[i] = np.clip(absorbed / (absorbed + main_proj[i]), 0.0, 1.0)
    if fraction[i] > 0:
      absorbers[i, :len(top)] = top
    best = int(np.argsort(-proj[i], kind="stable")[0])
    full[i] = bool(np.all(z[i, main] < EPS) and cos[best] >= FULL_COS and act_proj[i] > 0
                   and proj[i, best] / act_proj[i] >= PROPORTION)
    if full[i] and absorbers[i, 0] < 0:
      absorbers[i, 0] = best
  return {"fraction": fraction, "full": full, "absorbers": absorbers}


# ---------------------------------------------------------------------------------------------
# One SAE.


def site_probe(data: ProbeData, site: str) -> dict:
  """The letter probe at `site` and its test F1 per letter (shared by every SAE there)."""
  x_tr, y_tr = data.split(site, True)
  x_te, y_te = data.split(site, False)
  w, b = train_probe(x_tr, y_tr)
  scores = x_te @ w.T + b
  f1 = np.array([f1_score(scores[:, c] > 0, y_te == c) for c in range(len(LETTERS))])
  return {"w": w, "b": b, "f1": f1, "test_scores": scores}


def encode_all(sae, x: np.ndarray, batch: int = 1024) -> np.ndarray:
  import jax
  from jaxsae import saes as saes_lib
  graphdef, state = saes_lib.encoder(sae)
  fn = jax.jit(saes_lib.encode, static_argnums=0)
  return np.concatenate([np.asarray(fn(graphdef, state, x[i:i + batch], sae.input_scale))
                         for i in range(0, len(x), batch)])


def evaluate(sae, data: ProbeData, site: str, probe: dict | None = None) -> dict:
  """The absorption of one SAE (a formats.CanonicalSAE) at `site`: per letter and overall, and per
  latent whether it is a letter's main latent or absorbed for one."""
  probe = probe or site_probe(data, site)
  x_tr, y_tr = data.split(site, True)
  x_te, y_te = data.split(site, False)
  z_tr, z_te = encode_all(sae, x_tr), encode_all(sae, x_te)
  l1_w, _ = train_probe(z_tr, y_tr, l1=0.01, weight_decay=1e-6)
  mains, k_f1 = main_latents(z_tr, y_tr, z_te, y_te, l1_w)
  # Activations in the store's units: the SAE saw x * input_scale.
  z_te = z_te / sae.input_scale
  n = sae.n_latents
  main_letter = np.full(n, -1)
  absorbing = np.zeros(n, np.int64)
  per_letter = []
  for c, letter in enumerate(LETTERS):
    for j in mains[c]:
      main_letter[j] = c
    tp = (y_te == c) & (probe["test_scores"][:, c] > 0)
    row = {"letter": letter, "probe_f1": float(probe["f1"][c]),
           "counted": bool(probe["f1"][c] > MIN_PROBE_F1), "main_latents": mains[c],
           "k_sparse_f1": k_f1[c].round(4).tolist(), "probe_true_positives": int(tp.sum())}
    if tp.any():
      s = absorption_scores(x_te[tp], z_te[tp], probe["w"][c], sae.W_dec, mains[c])
      row.update(mean_absorption_fraction=float(s["fraction"].mean()),
                 full_absorption_rate=float(s["full"].mean()),
                 num_full_absorption=int(s["full"].sum()))
      if row["counted"]:
        ids = s["absorbers"][s["absorbers"] >= 0]
        np.add.at(absorbing, ids, 1)
    per_letter.append(row)
  counted = [r for r in per_letter if r["counted"] and "mean_absorption_fraction" in r]
  mean = lambda key: float(np.mean([r[key] for r in counted])) if counted else None
  return {"site": site, "letters_counted": len(counted),
          "mean_absorption_fraction": mean("mean_absorption_fraction"),
          "mean_full_absorption": mean("full_absorption_rate"),
          # SAEBench's aggregate counts a letter's main latents (its k), not k - 1.
          "mean_num_split_features": float(np.mean([len(r["main_latents"]) for r in counted]))
          if counted else None,
          "enough_letters": len(counted) >= MIN_LETTERS,
          "probe_f1": [round(float(v), 4) for v in probe["f1"]],
          "per_letter": per_letter, "main_letter": main_letter, "absorbing": absorbing}
