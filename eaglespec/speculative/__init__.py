"""Everything of one speculative step, in the order it runs: ``tree`` (tree shapes and the
fixed-shape tree batch), ``drafter`` (the head builds the trees), ``verifier`` (one target
forward over every node), ``acceptance`` (greedy and lossless sampled acceptance) and ``step``
(the whole step as one fixed-shape function, one CUDA graph per batch bucket); ``policy``
chooses which tree (or none) pays for a batch.
"""

from eaglespec.speculative.step import SpeculativeRunner
from eaglespec.speculative.tree import TreeShape, parse_tree

__all__ = ["SpeculativeRunner", "TreeShape", "parse_tree"]
