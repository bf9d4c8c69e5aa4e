"""Cloud TPU from any machine: which chips a topology names, what each can do, and libtpu kept
quiet where no TPU is attached.

With `libtpu` installed (`pip install jax[tpu]`), XLA's TPU compiler runs on a machine without a
TPU: `topology_devices("v5e:2x4")` gives that slice's devices, and a program jitted over a
Mesh of them compiles, so its memory and cost are XLA's own answers for those chips
(`jaxsae.train.compile_report`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import importlib.util
import os
import sys

from jaxsae.errors import JaxsaeError

# Google's PCI vendor id, which every TPU chip attached to a VM shows (jax's own test, in
# jax._src.hardware_utils, kept here so nothing private is imported).
_GOOGLE_PCI_VENDOR = "0x1ae0"


def tpu_attached() -> bool:
  """Whether this machine has TPU chips on its PCI bus."""
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor) as f:
        if f.read().strip() == _GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False


def keep_libtpu_quiet() -> None:
  """Where libtpu is installed but no TPU is attached, JAX's backends start without it.

  Left alone, JAX initialises every installed plugin, and libtpu on a machine without chips
  prints a screen of errors about TPU_WORKER_HOSTNAMES and takes about twice as long to start
  (1.7 s against 2.9 s for `jax.devices()` here); compiling for a topology needs no TPU
  backend. A JAX_PLATFORMS the user set, a visible GPU or an attached TPU leave JAX's choice
  as it is. Runs before any backend starts (jaxsae's import), so the choice holds.
  """
  if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("libtpu") is None:
    return
  if tpu_attached() or any(os.path.exists(d) for d in ("/dev/nvidia0", "/dev/nvidiactl")):
    return
  if "jax" in sys.modules:  # imported first: its config read the environment already
    import jax
    if not jax.config.jax_platforms:
      jax.config.update("jax_platforms", "cpu")
  else:  # without importing jax (the CLI's extract never does), for this process and its children
    os.environ["JAX_PLATFORMS"] = "cpu"


@dataclasses.dataclass(frozen=True)
class Chip:
  """A TPU generation's published peaks, per chip."""
  name: str
  bf16_flops: float  # dense bfloat16 FLOP/s
  hbm_bandwidth: float  # bytes/s
  hbm_bytes: float


# Google Cloud's published per-chip figures (cloud.google.com/tpu/docs/system-architecture-tpu-vm
# and each generation's page), keyed by the device_kind libtpu gives their devices.
CHIPS = {
    "TPU v4": Chip("v4", 275e12, 1228e9, 32 * 2**30),
    "TPU v5 lite": Chip("v5e", 197e12, 819e9, 16 * 2**30),
    "TPU v5": Chip("v5p", 459e12, 2765e9, 95 * 2**30),
    "TPU v6 lite": Chip("v6e", 918e12, 1640e9, 32 * 2**30),
}


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str  # as given: v5e:2x4
  devices: tuple  # jax devices, one per mesh position
  chip: Chip
  devices_per_chip: int  # 2 where libtpu exposes each of a chip's TensorCores (v4 here)
  num_hosts: int

  @property
  def per_device(self) -> Chip:
    """One device's share of its chip: what a program compiled for one device may use."""
    c, n = self.chip, self.devices_per_chip
    return Chip(c.name, c.bf16_flops / n, c.hbm_bandwidth / n, c.hbm_bytes / n)


@contextlib.contextmanager
def _no_tpu_vm_lookups():
  """libtpu, asked for a topology off a TPU VM, looks for the VM's accelerator type and worker
  hostnames and prints its failure; neither matters to a compile, so both are given for the
  call (and the user's own values are kept where set). Several processes may compile at once
  (test workers): libtpu's lock on the chips it would own has nothing to guard here."""
  saved = {k: os.environ.get(k) for k in ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES",
                                          "TPU_SKIP_MDS_QUERY", "ALLOW_MULTIPLE_LIBTPU_LOAD")}
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-8")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    yield
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def topology(name: str) -> Topology:
  """The devices of TPU slice `name` (GENERATION:AxB[xC], as libtpu names them: v5e:2x4,
  v4:2x2x1, v5p:2x2x2, v6e:4x4, v5e:16x16), whether or not this machine has a TPU."""
  if importlib.util.find_spec("libtpu") is None:
    raise JaxsaeError(f"--topology={name} compiles with XLA's TPU compiler, which ships in "
                      "libtpu: pip install 'jax[tpu]' (the version of jax installed)")
  from jax.experimental import topologies
  try:
    with _no_tpu_vm_lookups():
      devices = tuple(topologies.get_topology_desc(name, "tpu").devices)
  except Exception as e:  # libtpu's errors are XlaRuntimeErrors with pages of context
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise JaxsaeError(f"--topology={name}: libtpu does not know this slice ({first[:200]}); "
                      "write it as GENERATION:AxB[xC], e.g. v5e:2x4, v4:2x2x1, v6e:4x4")
  return of_devices(name, devices)


def of_devices(name: str, devices) -> Topology:
  """The Topology of TPU `devices` (a topology's, or the slice this process runs on)."""
  kind = devices[0].device_kind
  if kind not in CHIPS:
    raise JaxsaeError(f"--topology={name}: no published peaks for {kind!r} in jaxsae.tpu.CHIPS "
                      f"(known: {', '.join(CHIPS)})")
  per_chip = {}
  for d in devices:
    per_chip.setdefault((d.process_index, tuple(d.coords)), []).append(d)
  return Topology(name=name, devices=tuple(devices), chip=CHIPS[kind],
                  devices_per_chip=len(devices) // len(per_chip),
                  num_hosts=len({d.process_index for d in devices}))
