"""Graph rewrites, in the style of ``torch.fx.passes.infra``: ``GraphModule -> PassResult``.

They import torch only. ``InlineProgram`` puts a recorded program into an
exported graph, ``StripSites`` removes the site markers and dead code, and
``CheckShapes`` propagates fake tensors to catch shape errors before a run.
"""

from .check_shapes import CheckShapes
from .inline_program import InlineProgram
from .strip_sites import StripSites

__all__ = ["CheckShapes", "InlineProgram", "StripSites"]
