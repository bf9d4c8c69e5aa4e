"""The field helper every stage's config dataclass is written with.

A field's `metadata["help"]` is its help text and its default the flag's default: cli.py reads
both to define one absl flag per field, so `--help` and the config cannot disagree. A
`positional` field takes the command's positional arguments instead of a flag. This lives
below every stage, so that a stage describes its config without importing the command line.
"""

from __future__ import annotations

import dataclasses
from typing import Any


def field(default: Any, help: str, *, positional: bool = False) -> Any:  # noqa: A002
  """A config dataclass field that becomes the flag --NAME with this default and help."""
  metadata = {"help": help, "positional": True} if positional else {"help": help}
  return dataclasses.field(default=default, metadata=metadata)
