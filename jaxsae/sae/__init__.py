"""SAE architectures: one Flax NNX module each, one mapping from `--arch` name to module.

Each module is readable alone: its initialisation, `encode` (the firing rule), `loss`, and
what it shares with every other in `common.SAE` (the dictionary, `decode`, `export`).
"""

from __future__ import annotations

from jaxsae.sae.batchtopk import BatchTopK
from jaxsae.sae.common import SAE, SaeConfig, Statistic
from jaxsae.sae.gated import Gated
from jaxsae.sae.jumprelu import JumpReLU
from jaxsae.sae.matryoshka import Matryoshka
from jaxsae.sae.relu_l1 import ReluL1, ReluL1UnitNorm
from jaxsae.sae.topk import TopK

ARCHITECTURES: dict[str, type[SAE]] = {
    "topk": TopK,
    "relu_l1": ReluL1,
    "relu_l1_unitnorm": ReluL1UnitNorm,
    "gated": Gated,
    "jumprelu": JumpReLU,
    "batchtopk": BatchTopK,
    "matryoshka": Matryoshka,
}

__all__ = ["ARCHITECTURES", "SAE", "SaeConfig", "Statistic", "BatchTopK", "Gated", "JumpReLU",
           "Matryoshka", "ReluL1", "ReluL1UnitNorm", "TopK"]
