"""The `jaxsae` command: flags from config dataclasses, --help, flagfiles, one-line errors."""

from __future__ import annotations

import dataclasses

from absl import flags
import pytest

from jaxsae import cli
from jaxsae import extract
from jaxsae.errors import JaxsaeError


def test_flags_round_trip_into_the_config():
  fv = flags.FlagValues()
  cli.define_flags(extract.ExtractConfig, fv)
  fv(["prog", "--sites=a,b", "--num_tokens=7", "--keep_special_tokens", "--revision=main"])
  cfg = cli.config_from_flags(extract.ExtractConfig, [], fv)
  assert cfg.sites == ("a", "b") and cfg.num_tokens == 7 and cfg.keep_special_tokens
  assert cfg.revision == "main"
  assert dataclasses.replace(cfg, sites=extract.ExtractConfig.sites, num_tokens=1_000_000,
                             keep_special_tokens=False, revision=None) == extract.ExtractConfig()


def test_positional_arguments_are_refused_where_a_command_takes_none():
  fv = flags.FlagValues()
  cli.define_flags(extract.ExtractConfig, fv)
  fv(["prog"])
  with pytest.raises(JaxsaeError, match="unexpected arguments stray"):
    cli.config_from_flags(extract.ExtractConfig, ["stray"], fv)


# `forks.run(*ARGS)` is `python -m jaxsae.cli ARGS` in a process of its own (tests/forks.py).


def test_help_lists_every_flag_with_its_default(forks):
  out = forks.run("extract", "--help")
  assert out.returncode == 0
  for f in dataclasses.fields(extract.ExtractConfig):
    assert f"--{f.name} (default: " in out.stdout
  assert "--ctx_len (default: 256)" in out.stdout
  top = forks.run("--help")
  assert top.returncode == 0 and "jaxsae extract:" in top.stdout and "--shard_range" in top.stdout


def test_flagfile_and_one_line_errors(forks, tmp_path):
  ff = tmp_path / "bad.flags"
  ff.write_text("--model=/no/such/model\n--out=" + str(tmp_path / "s") + "\n")
  out = forks.run("extract", f"--flagfile={ff}")
  assert out.returncode == 1
  assert out.stderr.strip().splitlines()[-1].startswith("jaxsae extract: error: --model=/no/such")
  assert "Traceback" not in out.stderr
  out = forks.run("nonsense")
  assert out.returncode == 2 and "unknown command 'nonsense'" in out.stderr
