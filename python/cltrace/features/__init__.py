"""Feature pages: what each transcoder feature fires on and what it promotes, built offline
from a corpus for any transcoder set (``cltrace features``), in the layouts circuit-tracer's
viewer and Neuronpedia read, with a short automatic label per feature (the graph's ``clerp``).

    state     the bounded per-feature state of a corpus scan (exact top-K, sample, histogram)
    scan      pass 1: one forward + one encode per token, folded into the state
    cluster   pass 1 on Ray actors (``--ray``): row shards scanned remotely, merged here
    windows   pass 2: activations around each kept example, recomputed for those rows only
    logits    top/bottom logits of a feature's decoder direction
    pages     one page (reference JSON format) and its label
    store     the files (per-feature JSON, hosted binary layout, labels), FeaturePages
    build     the whole job, resumable
    settings  FeatureSettings: the one source of the job's defaults (and its options)
"""
from .build import BuildResult, build_pages
from .settings import FeatureSettings
from .state import FeatureState, LayerState, merge_states
from .store import FeaturePages, cantor, pages_for_graph, uncantor

__all__ = ["BuildResult", "FeaturePages", "FeatureSettings", "FeatureState", "LayerState", "build_pages", "cantor",
           "merge_states", "pages_for_graph", "uncantor"]
