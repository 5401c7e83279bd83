"""The package's shape: each stage imports only the stages below it, ``import cltrace`` is
cheap (no torch, no transformers until a name is used), and what the docstrings and comments
point at exists: every ``:mod:``/``:func:``/``:class:``/``:meth:`` target and plain
``cltrace.<package>.<name>`` mention resolves, every ``docs/<page>.md`` path cited is in the repository, and
nothing cites the design notes kept outside it. The tests' shape: helpers only in tests/support
(no test module imports another), and CI runs the README's test command, the full suite."""
from __future__ import annotations

import ast
import importlib
import io
import re
import subprocess
import sys
import tokenize
import types
from pathlib import Path

import cltrace

REPO = Path(__file__).resolve().parents[1]  # the checkout (cltrace itself may be installed elsewhere)
ROOT = REPO / "python" / "cltrace"  # its sources: what these tests read
assert ROOT.is_dir() and Path(cltrace.__file__).name == "__init__.py"

# The pipeline, bottom to top: a module may import only from a lower rank (or its own package).
RANK = {
    "__version__": -1, "_C": -1, "errors": -1, "settings": -1,
    "ops": 0, "reference": 0, "atomic": 0, "ray_pool": 0,
    "graph": 1, "models": 1,
    "transcoders": 2, "export": 2,
    "frozen": 3, "evaluation": 3,  # evaluation: models, transcoders and ops only (its docstring)
    "lens": 3,  # the top latents of dictionaries on a text: models, transcoders and ops only
    "replacement": 4,
    "attribution": 5, "steering": 5, "training": 5,
    "features": 6, "attention": 6,
    "pipeline": 7,  # one prompt end to end: strings the stages above together
    "batch": 8, "serve": 8,
    "contrast": 9,  # the statistics and report of a batch's graphs (its prompt rows, store, manifest)
    "commands": 10, "cli": 11,  # cli dispatches to the commands
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


# --- what docstrings and comments point at ------------------------------------------------------

_ROLE = re.compile(r":(?:py:)?(mod|func|class|meth|attr|data|obj|exc):`([^`]+)`")
_PLAIN = re.compile(r"(?<![\w./-])cltrace(?:\.[A-Za-z_]\w*)+")  # "see cltrace.graph.pruning"
_DOCS_PATH = re.compile(r"(?<![\w./-])docs/[\w./-]*?\.md\b")
_OUTSIDE_NOTES = "DESIGN" + ".md"  # the design notes live outside the repository: cite docs/


def _prose(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every comment and every string statement (docstrings) of a file."""
    src = path.read_text()
    out = [(t.start[0], t.string) for t in tokenize.generate_tokens(io.StringIO(src).readline)
           if t.type == tokenize.COMMENT]
    out += [(n.lineno, n.value.value) for n in ast.walk(ast.parse(src))
            if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)
            and isinstance(n.value.value, str)]
    return out


def _module_of(path: Path) -> tuple[str, str]:
    """(module, package) of a file in python/cltrace: the module's name and the package that
    relative targets (``.x``, ``..x``) are resolved against, as Python resolves imports."""
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
        return ".".join(parts), ".".join(parts)
    return ".".join(parts), ".".join(parts[:-1])


def _kind_ok(role: str, obj) -> bool:
    if role == "mod":
        return isinstance(obj, types.ModuleType)
    if role == "class":
        return isinstance(obj, type)
    if role in ("func", "meth"):
        return callable(obj) or isinstance(obj, (property, staticmethod, classmethod))
    return True


def _resolves(name: str, role: str) -> bool:
    """Whether the dotted ``name`` is a module, or an attribute path inside one, of ``role``'s
    kind. Dataclass fields and annotated names count as attributes."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        rest = parts[i:]
        for j, p in enumerate(rest):
            if isinstance(obj, type) and p in vars(obj):
                obj = vars(obj)[p]
            elif hasattr(obj, p):
                obj = getattr(obj, p)
            else:
                fields = set(getattr(obj, "__dataclass_fields__", {})) | set(getattr(obj, "__annotations__", {}))
                return j == len(rest) - 1 and p in fields
        return _kind_ok(role, obj)
    return False


def _own_names(path: Path) -> set[str]:
    """Top-level names a file defines, and ``Class.member`` for its classes' members."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names |= {f"{node.name}.{m.name}" for m in node.body
                      if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def _candidates(target: str, module: str, package: str) -> list[str]:
    """Where a role's target may live: a relative target (``.x``) in ``package`` only; a bare
    one in the module itself, in one of its classes (a method named in its class's docstring),
    then as an absolute name (``cltrace.`` may be left out)."""
    t = target.strip().lstrip("~!").removesuffix("()")
    if t.startswith("."):
        up = len(t) - len(t.lstrip("."))
        base = package.split(".")
        base = base[: len(base) - up + 1]
        return [".".join(base + ([t.lstrip(".")] if t.lstrip(".") else []))]
    out = []
    if module:
        out.append(f"{module}.{t}")
        try:
            mod = importlib.import_module(module)
        except ImportError:
            mod = None
        out += [f"{module}.{k}.{t}" for k, v in vars(mod or object).items()
                if isinstance(v, type) and v.__module__ == module]
    return out + [t, f"cltrace.{t}"]


def _broken_references() -> list[str]:
    broken = []
    files = [(p, *_module_of(p)) for p in sorted(ROOT.rglob("*.py"))]
    files += [(p, "", "") for p in sorted((REPO / "tests").rglob("*.py"))]
    for path, module, package in files:
        own = None if module else _own_names(path)
        for line, text in _prose(path):
            where = f"{path.relative_to(REPO)}:{line}"
            for m in _ROLE.finditer(text):
                role, target = m.groups()
                bare = target.strip().lstrip("~!").removesuffix("()")
                if own is not None and (bare in own or bare.split(".")[0] in own):
                    continue
                if bare.startswith(".") and not package:
                    broken.append(f"{where}: {m.group(0)} (relative, outside python/cltrace)")
                elif not any(_resolves(c, role) for c in _candidates(target, module, package)):
                    broken.append(f"{where}: {m.group(0)}")
            for m in _PLAIN.finditer(text):
                if not _resolves(m.group(0), "obj"):
                    broken.append(f"{where}: {m.group(0)}")
    return broken


def test_docstring_references_resolve():
    """Every :mod:/:func:/:class:/:meth: target (``.x`` relative to the containing package, as
    in an import) and every plain ``cltrace.<package>.<name>`` in python/cltrace's and tests' docstrings and
    comments names something that exists, of the right kind (a module for :mod:, a class for
    :class:, a callable for :func:/:meth:)."""
    broken = _broken_references()
    assert not broken, "references to nothing:\n" + "\n".join(broken)


# --- the tests' own layout ----------------------------------------------------------------------

def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in the file, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


def test_tests_share_helpers_only_through_the_support_package():
    """tests/ holds test modules, conftest.py and the ``support`` package, nothing else; no
    file under tests/ imports a test module or conftest (helpers live in tests/support)."""
    tests = REPO / "tests"
    test_modules = {p.stem for p in tests.glob("test_*.py")} | {"conftest"}
    stray = sorted(p.name for p in tests.glob("*.py") if p.stem not in test_modules)
    assert not stray, f"helpers belong in tests/support/: {stray}"
    assert (tests / "support" / "__init__.py").is_file()
    imports = [f"{p.relative_to(REPO)}:{line} imports {module}"
               for p in sorted(tests.rglob("*.py")) for line, module in _imported_modules(p)
               if module.split(".")[0] in test_modules]
    assert not imports, "import helpers from tests/support instead:\n" + "\n".join(imports)


def test_ci_runs_the_readme_test_command_on_the_full_suite():
    """.ci/run runs the README's test command verbatim, and that command runs every tier."""
    readme, ci = (REPO / "README.md").read_text(), (REPO / ".ci" / "run").read_text()
    block = re.search(r"\*\*Tests\*\*.*?```bash\n(.*?)\n```", readme, re.S)
    assert block, "README.md: no Tests block"
    command = block.group(1).strip()
    assert command in ci.splitlines(), f".ci/run does not run the README's test command: {command}"
    assert re.search(r"pytest\b.*--full\b", command), f"the README's test command is not the full suite: {command}"


def _repo_files(*folders: str) -> list[Path]:
    """The files of these folders that git tracks or would track (build outputs, virtual
    environments and caches left out); without git, every file outside hidden folders."""
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "--", *folders],
                             cwd=REPO, capture_output=True, text=True, check=True).stdout
        paths = [REPO / line for line in out.splitlines()]
    except (OSError, subprocess.CalledProcessError):
        paths = [p for f in folders for p in (REPO / f).rglob("*")
                 if not any(part.startswith(".") or part == "__pycache__"
                            for part in p.relative_to(REPO).parts)]
    return [p for p in paths if p.is_file() and p.stat().st_size < 5 << 20]


def _text(path: Path) -> str:
    data = path.read_bytes()
    return "" if b"\0" in data[:4096] else data.decode("utf-8", errors="replace")


def test_cited_docs_exist():
    """Every ``docs/<page>.md`` path that code, tests or benchmarks cite is in the repository."""
    missing = [f"{p.relative_to(REPO)}: {m.group(0)}"
               for p in _repo_files("python", "csrc", "tests", "benchmarks")
               for m in _DOCS_PATH.finditer(_text(p)) if not (REPO / m.group(0)).is_file()]
    assert not missing, "cited docs that do not exist:\n" + "\n".join(missing)


def test_no_reference_to_notes_outside_the_repository():
    """The design notes kept outside the repository are not cited: the facts the code relies on
    are in docs/ (a clone has no other copy)."""
    citing = [str(p.relative_to(REPO)) for p in _repo_files("python", "csrc", "tests", "benchmarks")
              if _OUTSIDE_NOTES in _text(p)]
    assert not citing, f"cite docs/*.md instead of {_OUTSIDE_NOTES}: " + ", ".join(citing)
