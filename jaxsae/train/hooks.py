"""What the loop runs after each step: hooks (levanter's), the metrics writer and the clock."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Callable, NamedTuple

import jax
from flax import nnx


def _logged_step(line: str) -> float:
  """The step of a metrics.jsonl line; infinite for the partial line a kill can leave last."""
  try:
    return json.loads(line)["step"]
  except (json.JSONDecodeError, KeyError, TypeError):
    return math.inf


class MetricsWriter:
  """metrics.jsonl (one line per logged step, per-seed lists) and TensorBoard when available."""

  def __init__(self, out: str, names, start_step: int):
    self.names, self.path = list(names), os.path.join(out, "metrics.jsonl")
    self.active = jax.process_index() == 0
    self.tb = None
    if not self.active:
      return
    if os.path.exists(self.path):  # drop lines a killed run logged after its last checkpoint
      with open(self.path) as f:
        kept = [line.rstrip("\n") + "\n" for line in f if _logged_step(line) <= start_step]
      with open(self.path, "w") as f:
        f.writelines(kept)
    try:
      from tensorboardX import SummaryWriter  # optional; never a reason to fail a run
      self.tb = SummaryWriter(os.path.join(out, "tensorboard"))
    except ImportError:
      pass

  def write(self, record: dict) -> None:
    if not self.active:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self.tb is not None:
      for name, values in record.items():
        if isinstance(values, list):
          for member, v in zip(self.names, values):
            self.tb.add_scalar(f"{member}/{name}", v, record["step"])
      self.tb.add_scalar("lr", record["lr"], record["step"])

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()



class Tick(NamedTuple):
  """Where the loop is after a step: what every hook is given."""
  step: int
  state: nnx.State
  metrics: dict[str, jax.Array]  # per seed, from the step just taken
  skipped: int  # non-finite store rows skipped so far (--skip_non_finite)


@dataclasses.dataclass(frozen=True)
class Hook:
  """`fn(tick)` after every `every`-th step and after the steps in `at` (levanter's hooks)."""
  fn: Callable[[Tick], None]
  every: int = 0
  at: frozenset[int] = frozenset()

  def __call__(self, tick: Tick) -> None:
    if (self.every and tick.step % self.every == 0) or tick.step in self.at:
      self.fn(tick)


class Throughput:
  """Tokens per second since this process's first step (its compilation is not throughput),
  and how long the steps waited for their batches."""

  def __init__(self, batch_size: int, num_seeds: int, num_streams: int = 1):
    self.batch_size, self.num_seeds, self.num_streams = batch_size, num_seeds, num_streams
    self.t0, self.first = 0.0, None
    self.wait, self.wait_steps = 0.0, 0  # since the last `rates`
    self.wait_since = time.perf_counter()

  def waited(self, seconds: float) -> None:
    """A step waited `seconds` for its batch from the store."""
    self.wait += seconds
    self.wait_steps += 1

  def tick(self, tick: Tick) -> None:
    if self.first is None:
      jax.block_until_ready(tick.state)
      self.t0, self.first = time.perf_counter(), tick.step

  def rates(self, step: int) -> dict[str, float]:
    """Per seed: tokens each seed trains on; stream: tokens read from the store (one shared
    stream, or with --data_seeds one per distinct data order); all seeds: S times per seed.
    input_wait_s: the mean wait of a step for its batch since the last call; input_wait_frac:
    the share of the time since then spent waiting (near 1: the store sets the pace)."""
    now = time.perf_counter()
    per_seed = self.batch_size * (step - self.first) / max(now - self.t0, 1e-9)
    wait = {"input_wait_s": self.wait / max(self.wait_steps, 1),
            "input_wait_frac": min(self.wait / max(now - self.wait_since, 1e-9), 1.0)}
    self.wait, self.wait_steps, self.wait_since = 0.0, 0, now
    return {"tokens_per_s_per_seed": per_seed, "tokens_per_s_stream": per_seed * self.num_streams,
            "tokens_per_s_all_seeds": per_seed * self.num_seeds, **wait}

