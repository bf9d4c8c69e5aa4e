"""jaxsae: do sparse autoencoders trained on the same data, differing only in seed, learn the same features?

Stages, in the one direction data flows: extract -> store -> train -> match -> report.
"""

__version__ = "0.1.0"

from jaxsae import tpu as _tpu

# Before any JAX backend starts: libtpu installed on a machine without a TPU stays silent.
_tpu.keep_libtpu_quiet()
