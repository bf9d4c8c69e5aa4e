"""SAE architectures: one small module each, one mapping from `--arch` name to architecture.

Each module is readable alone: `init`, `encode`, `decode`, `loss` over a params dict
{W_enc [d_in, n], b_enc [n], W_dec [n, d_in], b_dec [d_in], + extras}; see `common.Architecture`.
"""

from __future__ import annotations

from jaxsae.sae import batchtopk
from jaxsae.sae import gated
from jaxsae.sae import jumprelu
from jaxsae.sae import relu_l1
from jaxsae.sae import topk
from jaxsae.sae.common import Architecture, SaeConfig

ARCHITECTURES: dict[str, Architecture] = {
    "topk": topk.ARCH,
    "relu_l1": relu_l1.ARCH,
    "relu_l1_unitnorm": relu_l1.ARCH_UNIT_NORM,
    "gated": gated.ARCH,
    "jumprelu": jumprelu.ARCH,
    "batchtopk": batchtopk.ARCH,
}

__all__ = ["ARCHITECTURES", "Architecture", "SaeConfig"]
