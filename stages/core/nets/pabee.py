"""PABEE (Zhou et al. 2020, *BERT Loses Patience*): SDN's independent ICs, trained on the depth-weighted
average of the exits' losses (their `modeling_albert_pabee.py`: `total_loss += loss * (ix + 1)`, then
divided by the sum of the weights). Its exit rule is the `patience` criterion (`stages.core.evaluation`),
which works with every method.
"""

from __future__ import annotations

from torch import Tensor

from exitflow.stages.core.nets.exit_method import ExitMethod, depth_weights


class PABEE(ExitMethod):
    """Independent ICs (as SDN's) and the depth-weighted loss."""

    name = "pabee"

    def loss_weights(self, num_exits: int) -> Tensor:
        return depth_weights(num_exits)
