"""The offline corpora: wiki markup stripping, archive readers, the local-files path."""

from __future__ import annotations

import io
import tarfile

import pytest

from jaxsae import corpus
from jaxsae.errors import JaxsaeError


def test_strip_wiki_keeps_prose_and_drops_markup():
  text = ("'''Anarchism''' is a [[political philosophy|philosophy]]{{sfn|Smith|2001}} that "
          "<ref name=a>cite</ref>advocates [[self-governance]].\n== History ==\n"
          "[[File:A.jpg|thumb|a [[caption]]]]\n{| class=wikitable\n| cell\n|}\n"
          "[[Category:Anarchism]]")
  assert corpus.strip_wiki(text) == (
      "Anarchism is a philosophy that advocates self-governance.\nHistory")


def test_brown_tags_are_stripped():
  assert corpus._strip_brown("The/at jury/nn said/vbd ,/, ``/`` no/at ''/'' ./.") == \
      'The jury said, "no".'


def _deb(files: dict[str, bytes]) -> bytes:
  data = io.BytesIO()
  with tarfile.open(fileobj=data, mode="w:xz") as t:
    for name, body in files.items():
      info = tarfile.TarInfo(name)
      info.size = len(body)
      t.addfile(info, io.BytesIO(body))
  out = b"!<arch>\n"
  for name, body in [("debian-binary", b"2.0\n"), ("data.tar.xz", data.getvalue())]:
    out += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode() + body
    out += b"\n" * (len(body) % 2)
  return out


def test_deb_members_reads_the_data_archive(tmp_path):
  path = tmp_path / "x_1.0_all.deb"
  path.write_bytes(_deb({"./usr/share/doc/a.rst.txt": b"hello", "./b": b"odd"}))
  assert dict(corpus._deb_members(str(path))) == {"./usr/share/doc/a.rst.txt": b"hello",
                                                  "./b": b"odd"}
  (tmp_path / "bad.deb").write_bytes(b"nope")
  with pytest.raises(JaxsaeError, match="not a Debian package"):
    list(corpus._deb_members(str(tmp_path / "bad.deb")))


def test_local_files_one_document_per_text_file_or_json_record(tmp_path):
  (tmp_path / "t").mkdir()
  (tmp_path / "t" / "a.txt").write_text("first line\nsecond line\n")
  (tmp_path / "t" / "b.txt").write_text("another document")
  assert list(corpus.documents(str(tmp_path / "t"))) == ["first line\nsecond line\n",
                                                         "another document"]
  with pytest.raises(JaxsaeError, match="no column 'body'"):
    list(corpus.documents(str(tmp_path / "t"), text_column="body"))
  (tmp_path / "t" / "c.txt").write_bytes(b"caf\xe9")  # Latin-1, not UTF-8
  with pytest.raises(JaxsaeError, match="c.txt is not UTF-8 text"):
    list(corpus.documents(str(tmp_path / "t")))
  (tmp_path / "r.jsonl").write_text('{"body": "x y"}\n{"body": "z"}\n')
  assert list(corpus.documents(str(tmp_path / "r.jsonl"), text_column="body")) == ["x y", "z"]
  with pytest.raises(JaxsaeError, match="no column 'text'"):
    list(corpus.documents(str(tmp_path / "r.jsonl")))
  with pytest.raises(JaxsaeError, match="no such file"):
    list(corpus.documents(str(tmp_path / "missing" / "x.txt")))


def test_text_files_read_as_datasets_reads_them(tmp_path):
  """jaxsae reads .txt files itself; each document is what `datasets`' text loader (by
  document) gives for the same files: newlines of every kind, non-ASCII, an empty file, order."""
  import datasets
  texts = {"a.txt": "one\r\ntwo\rthree\n", "b.txt": "", "c.txt": "naïve — ∑ 🙂\n\n",
           "d.txt": "no newline at the end"}
  (tmp_path / "docs").mkdir()
  for name, text in texts.items():
    (tmp_path / "docs" / name).write_bytes(text.encode("utf-8"))
  files = [str(tmp_path / "docs" / n) for n in sorted(texts)]
  theirs = datasets.load_dataset("text", data_files=files, split="train", sample_by="document",
                                 cache_dir=str(tmp_path / "cache"))
  assert list(corpus.documents(str(tmp_path / "docs"))) == [row["text"] for row in theirs]
  assert list(corpus.documents(",".join(files[::-1]))) == [row["text"] for row in theirs][::-1]
