"""GGUF files read once and quickly while transformers loads a model or tokenizer from one.

transformers parses the whole file for the tokenizer, again for the config and again for the
weights, with gguf's reader: a Python loop over every metadata entry that slices an np.memmap
for each (a Python `__array_finalize__` per slice). For Gemma 3 270M's 262K-token vocabulary
that was ~20 s a parse on 2 cores, three parses per load (85 s a load; 27 s within
`read_once`). Then, to name the weights, it builds gguf's table of tensor names
(`gguf.get_tensor_name_map`) once for every submodule of the model, 397 times for SmolLM2 at
27 ms each (11 s of its 18 s load); within `read_once` the table of an architecture and depth
is built once. Both extraction and a match's token contexts read GGUF tokenizers.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

import numpy as np


@contextlib.contextmanager
def read_once() -> Iterator[None]:
  """Within it, `gguf.GGUFReader(path)` parses each file once and returns that reader again;
  the reader memory-maps the file read-only, so one serves every caller. Fields and tensors are
  gguf's own, their arrays plain ndarray views of the same mapped bytes. And
  `gguf.get_tensor_name_map(arch, n_blocks)` builds each table once (its callers only look
  names up in it)."""
  import gguf

  made, cls = {}, gguf.GGUFReader
  maps, name_map = {}, gguf.get_tensor_name_map

  class Reader(cls):
    def _build_fields(self, offs, count):
      self.data = self.data.view(np.ndarray)  # the same bytes; slicing it runs no Python
      return super()._build_fields(offs, count)

    def _get_field_parts(self, orig_offs, raw_type):
      """gguf's parts of an array of strings or scalars, built without its recursion per
      element (three `_get`s and an enum per string: 4.6 of Gemma 3's 262K-token vocabulary's
      seconds): the same views of the same bytes, with the same dtypes, data and types."""
      t = gguf.GGUFValueType
      if raw_type != t.ARRAY:
        return super()._get_field_parts(orig_offs, raw_type)
      raw_itype, alen = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
      itype, n, offs = int(raw_itype[0]), int(alen[0]), orig_offs + 12
      parts, types = [raw_itype, alen], [t.ARRAY] + ([t(itype)] if n else [])
      order = lambda d: np.dtype(d).newbyteorder(self.byte_order)
      if itype == t.STRING:
        data, u64 = self.data, order(np.uint64)
        endian = sys.byteorder if self.byte_order == "I" else {"little": "big",
                                                               "big": "little"}[sys.byteorder]
        raw = memoryview(data)
        for _ in range(n):
          size = int.from_bytes(raw[offs:offs + 8], endian)
          parts += (data[offs:offs + 8].view(u64), data[offs + 8:offs + 8 + size])
          offs += 8 + size
        return offs - orig_offs, parts, list(range(3, 2 * n + 2, 2)), types
      if itype in self.gguf_scalar_to_np:
        d = order(self.gguf_scalar_to_np[t(itype)])
        values = self.data[offs:offs + n * d.itemsize].view(d)
        parts += list(values.reshape(n, 1))  # one 1-element view each, as gguf's
        return 12 + n * d.itemsize, parts, list(range(2, n + 2)), types
      return super()._get_field_parts(orig_offs, raw_type)  # arrays of arrays

  def reader(path, mode="r"):
    key = (os.path.realpath(path), mode)
    if key not in made:
      made[key] = Reader(path, mode)
    return made[key]

  def tensor_name_map(arch, n_blocks):
    if (arch, n_blocks) not in maps:
      maps[arch, n_blocks] = name_map(arch, n_blocks)
    return maps[arch, n_blocks]

  # transformers imports both names from the package at each call.
  gguf.GGUFReader, gguf.get_tensor_name_map = reader, tensor_name_map
  try:
    yield
  finally:
    gguf.GGUFReader, gguf.get_tensor_name_map = cls, name_map
