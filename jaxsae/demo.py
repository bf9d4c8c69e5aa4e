"""The whole pipeline on the offline default: SmolLM2-135M, Wikipedia + Django docs, on a CPU.

Each stage reuses what a previous run finished (the store, finished checkpoints), so rerunning
`jaxsae demo` after an interruption picks up where it stopped.
"""

from __future__ import annotations

import dataclasses
import os

from jaxsae import extract


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  out: str = dataclasses.field(default="out/demo", metadata={"help":
      "Directory for everything the demo writes (store/, ...)."})
  num_tokens: int = dataclasses.field(default=400_000, metadata={"help":
      "Tokens of activations to extract."})
  ctx_len: int = dataclasses.field(default=256, metadata={"help": "Window length."})


def run(cfg: DemoConfig) -> None:
  store_dir = os.path.join(cfg.out, "store")
  extract.run(extract.ExtractConfig(num_tokens=cfg.num_tokens, ctx_len=cfg.ctx_len,
                                    out=store_dir))
