"""SAE architectures: one Flax NNX module each, and the one mapping from `--arch` name to module.

Each module is readable alone: its initialisation, `encode` (the firing rule), `loss`, and
what it shares with every other in `common.SAE` (the dictionary, `decode`, `export`). What the
trainer and the readers need to know of an architecture, its class says (`common.SAE`'s class
attributes); these mappings are built from them.
"""

from __future__ import annotations

from jaxsae.sae.batchtopk import BatchTopK
from jaxsae.sae.common import SAE, LossOut, SaeConfig, Statistic
from jaxsae.sae.gated import Gated
from jaxsae.sae.groupmax import GroupMax
from jaxsae.sae.jumprelu import JumpReLU
from jaxsae.sae.matryoshka import Matryoshka
from jaxsae.sae.relu_l1 import ReluL1, ReluL1UnitNorm
from jaxsae.sae.topk import TopK

ARCHITECTURES: dict[str, type[SAE]] = {
    cls.name: cls for cls in (TopK, ReluL1, ReluL1UnitNorm, Gated, JumpReLU, BatchTopK,
                              Matryoshka)}

# The module a file of each family is read into: the family's first architecture above, the one
# the others refine (ReluL1UnitNorm and Matryoshka encode as ReluL1 and BatchTopK do).
READERS: dict[str, type[SAE]] = {}
for _cls in ARCHITECTURES.values():
  READERS.setdefault(_cls.family, _cls)

# Rules jaxsae reads other libraries' files by but does not train.
READERS[GroupMax.family] = GroupMax

# Every name a file may give an architecture, jaxsae's own and other libraries', to its family.
FAMILY_OF: dict[str, str] = {
    name: cls.family for cls in (*ARCHITECTURES.values(), GroupMax)
    for name in (cls.family, cls.name, *cls.other_names)}

__all__ = ["ARCHITECTURES", "FAMILY_OF", "READERS", "SAE", "LossOut", "SaeConfig", "Statistic",
           "BatchTopK", "Gated", "GroupMax", "JumpReLU", "Matryoshka", "ReluL1", "ReluL1UnitNorm", "TopK"]
