"""The two sets of a contrast: two prompt files, or one JSONL whose ``label`` column names
each prompt's set (the files are read by :func:`cltrace.batch.prompts.read_prompts`, which
refuses unknown columns). Checked before any tracing: the labels, the set sizes."""
from __future__ import annotations

from ..errors import UsageError
from ..pipeline import slugify
from .stats import min_attainable_p


def labels_of(path, specs: list) -> tuple[list[str], list[int]]:
    """(the two ``label`` values, in order of first appearance; each prompt's set 0/1) of a
    one-file contrast (``specs``: its PromptSpecs, which carry the JSONL's ``label``); every
    prompt needs a label and there must be exactly two values."""
    names: list[str] = []
    for s in specs:
        lab = getattr(s, "label", None)
        if not lab:
            raise UsageError(f"{path}: prompt {s.slug!r} has no 'label' (a one-file contrast needs a "
                             f"string 'label' on every prompt)")
        if lab not in names:
            names.append(lab)
    if len(names) != 2:
        raise UsageError(f"{path}: 'label' must take exactly two values, found {len(names)}: "
                         f"{', '.join(map(repr, names[:5]))}")
    return names, [names.index(s.label) for s in specs]


def check_sizes(names: list[str], sizes: list[int], n_perm: int, alpha: float) -> None:
    """A UsageError naming the smaller set when the permutation test of these set sizes could
    not reach ``alpha`` (or a set has fewer than 2 prompts)."""
    small = min(range(2), key=lambda i: sizes[i])
    if min(sizes) < 2 or min_attainable_p(sizes[0], sizes[1], n_perm) > alpha:
        other = max(2, sizes[1 - small])
        need = next((k for k in range(2, 1000) if min_attainable_p(k, other, n_perm) <= alpha), 1000)
        raise UsageError(f"set {names[small]!r} has {sizes[small]} prompts: a permutation test "
                         f"against {sizes[1 - small]} prompts cannot reach p <= {alpha} (the smallest "
                         f"attainable is {min_attainable_p(max(sizes[0], 1), max(sizes[1], 1), n_perm):.3g}); "
                         f"give it at least {need}")


def set_prefix(name: str) -> str:
    """The prefix of a set's graph names: ``{prefix}-{slug}.json`` keeps two sets apart."""
    return slugify(name)[:24]
