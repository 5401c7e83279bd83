"""The package's shape: each stage imports only the stages below it, and ``import cltrace`` is
cheap (no torch, no transformers until a name is used)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import cltrace

ROOT = Path(cltrace.__file__).resolve().parent

# The pipeline, bottom to top: a module may import only from a lower rank (or its own package).
RANK = {
    "__version__": -1, "_C": -1,
    "ops": 0, "reference": 0, "atomic": 0, "ray_pool": 0,
    "graph": 1, "models": 1,
    "transcoders": 2, "export": 2,
    "frozen": 3,
    "replacement": 4,
    "attribution": 5, "steering": 5, "training": 5,
    "features": 6,
    "batch": 7, "serve": 7,
    "commands": 9, "cli": 9,
}


def _stage(module: str) -> str:
    """'cltrace.graph.pruning' -> 'graph'; the lazy top-level names resolve to their package."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module, names) of every ``import``/``from ... import`` in the file,
    at any depth (imports inside functions count too)."""
    rel = path.relative_to(ROOT.parent).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names if a.name.startswith("cltrace")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.startswith("cltrace"):
                out.append((node.lineno, module, [a.name for a in node.names]))
    return out


def test_every_stage_imports_only_the_stages_below_it():
    violations = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel == Path("__init__.py"):
            continue  # the lazy top-level API
        own = rel.parts[0].removesuffix(".py")
        assert own in RANK, f"{rel}: a new stage? give it a rank in tests/test_layout.py"
        for line, module, names in _imports(path):
            targets = [_stage(module)] if _stage(module) else [
                _stage(getattr(cltrace, "_LAZY", {}).get(n, f"cltrace.{n}")) for n in names]
            for target in targets:
                if target != own and RANK.get(target, 99) >= RANK[own]:
                    violations.append(f"{rel}:{line} ({own}, rank {RANK[own]}) imports {module} "
                                      f"({target}, rank {RANK.get(target)})")
    assert not violations, "imports upward:\n" + "\n".join(violations)


def _fresh(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_import_cltrace_is_cheap_and_lazy():
    loaded = _fresh("import sys, cltrace; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    assert loaded == "[]"
    # the graph half of the pipeline never needs transformers
    loaded = _fresh("import sys, cltrace.attribution, cltrace.graph, cltrace.export, cltrace.steering; "
                    "print('transformers' in sys.modules)")
    assert loaded == "False"
    # the public API resolves lazily to the stage that defines it
    names = _fresh("import cltrace; print(cltrace.attribute.__module__, cltrace.Graph.__module__, "
                   "cltrace.Intervention.__module__, cltrace.build_info().cpu)")
    assert names == "cltrace.attribution.trace cltrace.graph.graph cltrace.steering.interventions True"
