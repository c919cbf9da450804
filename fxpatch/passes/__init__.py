"""Graph rewrites, in the style of ``torch.fx.passes.infra``.

They import torch only. ``functionalize_program`` turns a recorded program
into a functional graph with eager torch's meaning (and checks its shapes on
fake tensors), ``InlineProgram`` puts it into an exported graph and
``StripSites`` removes the site markers and dead code; ``IndexBeforeLinear``,
``IndexToOps``, ``CountFromEnd``, ``OneDNNLinear`` and ``SpecializeNegativeInts`` ready a
graph for ``torch.compile``.
"""

from .count_from_end import CountFromEnd
from .functionalize_program import (
    CheckedProgram,
    FunctionalProgram,
    check_program,
    check_program_symbolic,
    functionalize_program,
)
from .index_before_linear import IndexBeforeLinear
from .index_to_ops import IndexToOps
from .inline_program import InlineProgram
from .onednn_linear import OneDNNLinear
from .specialize_negative_ints import SpecializeNegativeInts
from .strip_sites import StripSites

__all__ = ["CheckedProgram", "CountFromEnd", "FunctionalProgram", "IndexBeforeLinear", "IndexToOps", "InlineProgram",
           "OneDNNLinear", "SpecializeNegativeInts", "StripSites", "check_program", "check_program_symbolic",
           "functionalize_program"]
