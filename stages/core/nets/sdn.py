"""SDN (Kaya et al. 2019, *Shallow-Deep Networks*): every IC answers alone and trains on its own loss.

SDN is the protocol's defaults (`stages.core.nets.exit_method.ExitMethod`): the plainest method, and
the one every other method is compared with.
"""

from __future__ import annotations

from exitflow.stages.core.nets.exit_method import ExitMethod


class SDN(ExitMethod):
    """Independent ICs, each exit's cross-entropy, the phase's weights alone."""

    name = "sdn"
