"""The attribution graph as data: nodes and edges (:mod:`.graph`), influence on the logits
(:mod:`.influence`), pruning (:mod:`.pruning`), scores (:mod:`.scores`) and the token x layer
map of where the influence sits (:mod:`.relevance`). No torch modules,
no models: a graph can be read, pruned and scored without loading one."""
from .graph import Graph, NodeKind, NodeTable
from .influence import influence_of_rows
from .pruning import PruneResult, PruneSettings, check_threshold, find_threshold, prune
from .relevance import relevance
from .scores import GraphScores, graph_scores

__all__ = ["Graph", "GraphScores", "NodeKind", "NodeTable", "PruneResult", "PruneSettings", "check_threshold",
           "find_threshold", "graph_scores", "influence_of_rows", "prune", "relevance"]
