"""A GGUF file read within `gguf_reading.read_once` is the same file gguf's own reader reads,
parsed once however often transformers opens it."""

import gguf
import numpy as np
import pytest

from jaxsae import gguf_reading


def _write(path, endianess=gguf.GGUFEndian.LITTLE):
  w = gguf.GGUFWriter(str(path), "llama", endianess=endianess)
  w.add_uint32("llama.block_count", 3)
  w.add_string("general.name", "tiny")
  w.add_array("tokenizer.ggml.tokens", [f"tok{i}é" for i in range(2000)] + [""])
  w.add_array("tokenizer.ggml.scores", [float(i) / 7 for i in range(2000)])
  # Every other kind of array gguf writes: of ints, bools, none, and of arrays.
  w.add_array("tokenizer.ggml.token_type", [i % 5 for i in range(2000)])
  w.add_array("x.flags", [True, False, True])
  w.add_array("x.none", [])
  w.add_array("x.nested", [[1, 2], [3]])
  w.add_uint64("x.big", 2**40 + 3)
  w.add_tensor("w", np.arange(24, dtype=np.float32).reshape(4, 6))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.mark.parametrize("endianess", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG])
def test_read_once_reads_gguf_readers_fields_and_tensors_once(tmp_path, endianess):
  path = tmp_path / "m.gguf"
  _write(path, endianess)
  stock = gguf.GGUFReader
  want = stock(str(path))
  with gguf_reading.read_once():
    got = gguf.GGUFReader(str(path))
    assert gguf.GGUFReader(str(tmp_path / "." / "m.gguf")) is got  # parsed once per file
  assert gguf.GGUFReader is stock and isinstance(got, stock)  # restored on leaving
  assert list(got.fields) == list(want.fields)
  for name, f in want.fields.items():
    g = got.fields[name]
    assert (g.offset, g.data, g.types) == (f.offset, f.data, f.types), name
    assert len(g.parts) == len(f.parts) and all(
        a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
        for a, b in zip(g.parts, f.parts)), name
    assert g.contents() == f.contents(), name
  tokens = got.fields["tokenizer.ggml.tokens"]
  assert bytes(tokens.parts[tokens.data[-2]]) == "tok1999é".encode()
  assert got.fields["x.big"].contents() == 2**40 + 3
  (t,), (u,) = got.tensors, want.tensors
  assert t.name == u.name == "w" and np.array_equal(t.data, u.data)


def test_read_once_builds_each_tensor_name_table_once():
  stock = gguf.get_tensor_name_map
  want = stock(gguf.MODEL_ARCH.LLAMA, 3)
  with gguf_reading.read_once():
    got = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 3)
    assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 3) is got
    assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 4) is not got
  assert gguf.get_tensor_name_map is stock  # restored on leaving
  assert got.mapping == want.mapping
  assert got.get_name("model.layers.2.self_attn.q_proj") == "blk.2.attn_q"
