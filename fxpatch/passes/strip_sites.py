"""Pass: remove every site node and the code nothing uses.

After it runs the graph has no ``fxpatch::site`` node: each site's users use
the site's input directly (the value the model computed, or the scattered
value a write put there), and dead nodes are gone. A graph with no
intervention is the plain exported model.
"""

from __future__ import annotations

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .ops import is_site


class StripSites(PassBase):
    """``StripSites()(gm)``."""

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        graph = gm.graph
        for node in list(graph.nodes):
            if is_site(node):
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
        graph.eliminate_dead_code()
        gm.recompile()
        return PassResult(gm, True)
