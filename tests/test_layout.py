"""The floor plan, checked from the source text: imports go one way with no circle, entry points
stay thin, no function grows past 80 lines."""

import ast
import functools
import gc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "peco_scale"
# the old one-file aliases of the tools (``python -m peco_scale.export`` ...) import tools/
ALIASES = {"peco_scale.export", "peco_scale.probe", "peco_scale.plan", "peco_scale.tokenize",
           "peco_scale.collect", "peco_scale.plot", "peco_scale.visualize"}


@functools.cache
def _parse(path: Path) -> ast.Module:
    """The file's AST. CPython 3.11 can raise a spurious ``SystemError: AST constructor recursion
    depth mismatch`` (python/cpython#106905) in a busy process, as in a test worker that ran
    DeepSpeed before; a real syntax problem is a SyntaxError, so parsing again (at most twice more,
    with the garbage collector paused) hides nothing of ours."""
    text = path.read_text()
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(2):
            try:
                return ast.parse(text, filename=str(path))
            except SystemError:
                pass
        return ast.parse(text, filename=str(path))
    finally:
        if enabled:
            gc.enable()


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, at module level or inside functions."""
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets = set()
        for node in ast.walk(_parse(path)):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                found = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods] or [base]
            elif isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            else:
                continue
            for target in found:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    targets.add(target)
        graph[name] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_planted_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle():
    graph = _graph()
    assert "peco_scale.train.trainer" in graph and graph["peco_scale.train.pretrain"]  # the parser sees imports
    assert _cycles(graph) == []


def test_imports_go_one_way():
    def layer(mod: str) -> str:
        return mod.split(".")[1] if mod.count(".") else mod

    bad = []
    for mod, targets in _graph().items():
        for t in targets:
            if layer(t) == "tools" and layer(mod) != "tools" and mod not in ALIASES:
                bad.append((mod, t))  # the library never imports a CLI tool
            if layer(mod) in ("models", "data", "engine", "pictures") and layer(t) in ("train", "tools", "gpu_check"):
                bad.append((mod, t))  # lower layers never import the trainer or the tools
            if layer(mod) in ("models", "data") and layer(t) == "engine":
                bad.append((mod, t))
    assert bad == []


def test_entry_points_are_thin_and_functions_short():
    for launcher in (ROOT / "launch").glob("*.py"):
        assert len(launcher.read_text().splitlines()) < 50, launcher
    longest = max(((n.end_lineno - n.lineno + 1, f"{p.relative_to(ROOT)}:{n.name}")
                   for p in PKG.rglob("*.py") for n in ast.walk(_parse(p))
                   if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))))
    assert longest[0] < 80, longest


def test_the_kernels_folder_does_not_shadow_hugging_faces_kernels_package():
    """With the repository root on sys.path (``python -m`` from it; DeepSpeed's launcher puts the
    working directory on PYTHONPATH) the folder kernels/ must not take the name ``kernels`` from
    the installed package that transformers imports (UperNet), and peco_kernels still imports."""
    import os
    import subprocess
    import sys
    from importlib.metadata import PackageNotFoundError, distribution

    probe = ("import kernels, peco_kernels\n"
             "from transformers.models.upernet.modeling_upernet import UperNetHead\n"
             "print(kernels.__file__)\n"
             "print(peco_kernels.vq_nearest.__module__)\n")
    try:
        hf = bool(distribution("kernels"))
    except PackageNotFoundError:
        hf = False
    if not hf:  # without the package the name is simply missing, as it would be without this folder
        probe = "import peco_kernels\ntry:\n    import kernels\nexcept ModuleNotFoundError:\n    print('none')\n"
    res = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.split()
    if hf:
        assert not Path(lines[0]).resolve().is_relative_to(ROOT / "kernels"), lines
        assert lines[1].startswith("peco_kernels"), lines
    else:
        assert lines == ["none"], lines
