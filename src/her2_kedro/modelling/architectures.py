"""Every architecture a declared model or a checkpoint may name, registered by importing this module.

``attention_mil`` and ``encoder`` are registered by :mod:`her2_kedro.modelling.checkpoints`; the
other model families register themselves when their module is imported here.
"""

from her2_kedro.modelling.checkpoints import ARCHITECTURES

__all__ = ["ARCHITECTURES"]
