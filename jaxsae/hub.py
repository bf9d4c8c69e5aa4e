"""SAEs on the Hugging Face Hub, named `hf://OWNER/REPO[/SUBFOLDER][@REVISION]`.

A spec resolves to a folder of the local Hub cache (`snapshot_download`), so every reader in
`jaxsae.saes` sees an ordinary directory: a sparsify release (`layers.6.mlp/cfg.json` +
`sae.safetensors` per hookpoint), a SAELens release (`cfg.json` + `sae_weights.safetensors` per
folder) or a dictionary_learning one (`config.json` + `ae.pt`). Only the SAE files are fetched,
and only under SUBFOLDER when one is named, so `hf://EleutherAI/sae-llama-3-8b-32x/layers.6`
does not download the other 31 layers.

The cache and offline switch are the library's own (HF_HUB_CACHE or HF_HOME, HF_HUB_OFFLINE),
read when a spec is resolved rather than when huggingface_hub was imported, so a caller (or a
test) that sets them late is still obeyed.
"""

from __future__ import annotations

import dataclasses
import os
import re

from jaxsae.errors import JaxsaeError

PREFIX = "hf://"
# What a folder of any layout jaxsae reads holds; nothing else is downloaded.
# activation_scaler.json: the input scaling factor beside a SAELens checkpoint (saes.py).
SAE_FILES = ("cfg.json", "sae.safetensors", "sae_weights.safetensors", "config.json", "ae.pt",
             "activation_scaler.json")
_TRUE = {"1", "on", "yes", "true"}
# A snapshot folder of the Hub cache: .../models--OWNER--REPO/snapshots/<commit>/<rest>.
_SNAPSHOT = re.compile(r"models--(?P<repo>[^/]+)/snapshots/(?P<commit>[0-9a-f]{40})(?:/(?P<rest>.*))?$")


@dataclasses.dataclass(frozen=True)
class Spec:
  repo_id: str  # OWNER/REPO
  subfolder: str  # "" for the whole repo
  revision: str | None  # None: the default branch

  def __str__(self) -> str:
    sub = f"/{self.subfolder}" if self.subfolder else ""
    rev = f"@{self.revision}" if self.revision else ""
    return f"{PREFIX}{self.repo_id}{sub}{rev}"


def is_hub(spec) -> bool:
  return str(spec).startswith(PREFIX)


def parse(spec: str) -> Spec:
  """`hf://OWNER/REPO[/SUBFOLDER][@REVISION]` into its parts; the revision may hold slashes
  (`@refs/pr/3`), a repo name never holds `@`."""
  body = str(spec)[len(PREFIX):]
  path, _, revision = body.partition("@")
  parts = [p for p in path.strip("/").split("/") if p]
  if len(parts) < 2 or ("@" in str(spec) and not revision):
    raise JaxsaeError(f"{spec}: a Hub SAE is named hf://OWNER/REPO[/SUBFOLDER][@REVISION], "
                      "e.g. hf://EleutherAI/sae-pythia-70m-32k/layers.3")
  if any(p in (".", "..") for p in parts):
    raise JaxsaeError(f"{spec}: the subfolder may not contain '.' or '..' parts")
  return Spec("/".join(parts[:2]), "/".join(parts[2:]), revision or None)


def _offline() -> bool:
  # As huggingface_hub.constants computes it, but from the environment of now.
  env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
  return env.strip().lower() in _TRUE


def cache_dir() -> str:
  """The Hub cache the library would use, from the environment as it is now."""
  from huggingface_hub import constants
  if os.environ.get("HF_HUB_CACHE"):
    return os.path.expanduser(os.environ["HF_HUB_CACHE"])
  if os.environ.get("HF_HOME"):
    return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
  return constants.HF_HUB_CACHE


def _fetch_hint(spec: Spec) -> str:
  include = f" --include '{spec.subfolder}/*'" if spec.subfolder else ""
  rev = f" --revision {spec.revision}" if spec.revision else ""
  return f"`hf download {spec.repo_id}{rev}{include}`"


def _patterns(spec: Spec) -> list[str]:
  # fnmatch's * crosses "/", so "sub/*/cfg.json" also finds SAE folders nested deeper.
  prefix = f"{spec.subfolder}/" if spec.subfolder else ""
  return [f"{prefix}{sep}{name}" for name in SAE_FILES for sep in ("", "*/")]


def resolve(spec_str: str) -> str:
  """The local folder holding `spec_str`'s files, downloaded into the Hub cache if needed."""
  spec = parse(spec_str)
  try:
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hf_errors
  except ImportError:
    raise JaxsaeError(f"{spec}: reading Hub SAEs needs huggingface_hub; "
                      "`pip install huggingface_hub`")
  offline, cache = _offline(), cache_dir()
  not_cached = (f"{spec} is not in the Hugging Face cache ({cache})"
                + ("; HF_HUB_OFFLINE is set, so it cannot be downloaded: fetch it with "
                   f"{_fetch_hint(spec)} on a machine with network (into this cache), or unset "
                   "HF_HUB_OFFLINE" if offline else
                   f" and the Hub could not be reached; fetch it with {_fetch_hint(spec)}"))
  try:
    root = snapshot_download(spec.repo_id, revision=spec.revision, cache_dir=cache,
                             allow_patterns=_patterns(spec), local_files_only=offline)
  except hf_errors.RevisionNotFoundError:
    raise JaxsaeError(f"{spec}: the repo has no revision {spec.revision!r}; name a branch, tag "
                      "or commit it has")
  except hf_errors.RepositoryNotFoundError:
    raise JaxsaeError(f"{spec}: no such model repo on the Hub, or it is private or gated "
                      "(log in with `hf auth login`)")
  except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled):
    # (IncompleteSnapshotError, a cached snapshot lacking files, is a LocalEntryNotFoundError)
    raise JaxsaeError(not_cached)
  except (OSError, hf_errors.HfHubHTTPError) as e:
    first = (str(e).strip().splitlines() or [""])[0]  # the library's messages run to lines
    raise JaxsaeError(f"{spec}: download failed ({type(e).__name__}: {first}); check the "
                      f"network or fetch it with {_fetch_hint(spec)}")
  path = os.path.join(str(root), spec.subfolder) if spec.subfolder else str(root)
  if not os.path.isdir(path):
    # Offline, the library returns a cached snapshot of the revision whether or not it holds
    # this subfolder; online, the subfolder has no SAE files at all.
    if offline:
      raise JaxsaeError(not_cached)
    have = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))) if (
        os.path.isdir(root)) else []
    where = f"under {spec.subfolder}/" if spec.subfolder else "at all"
    raise JaxsaeError(f"{spec}: the repo has no SAE files {where} (its folders with SAE files: "
                      f"{', '.join(have) or 'none'}); jaxsae reads {', '.join(SAE_FILES)}")
  return path


def label(path: str) -> str | None:
  """`hf://OWNER/REPO[/REST]@COMMIT7` for a folder inside the Hub cache, else None: a
  readable name for SAEs whose local path is a cache snapshot."""
  m = _SNAPSHOT.search(os.path.abspath(str(path)))
  if not m:
    return None
  repo = m.group("repo").replace("--", "/", 1)
  rest = f"/{m.group('rest')}" if m.group("rest") else ""
  return f"{PREFIX}{repo}{rest}@{m.group('commit')[:7]}"
