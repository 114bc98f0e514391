"""Static facts about the package's shape: module sizes, function lengths, the import graph.

Used by tests/test_layout.py (the redesign's rules) and runnable for a report:

    python tests/package_layout.py [PACKAGE_DIR]
"""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple

PACKAGE = Path(__file__).resolve().parents[1] / 'timm_bcos'


@dataclass(frozen=True)
class Function:
    module: str
    name: str
    lines: int
    docstring: str


@dataclass(frozen=True)
class Import:
    importer: str
    target: str  # a module of the package
    names: Tuple[str, ...]  # the names taken from it ('*' for a plain import)
    line: int


def modules(package: Path = PACKAGE) -> Dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package (``pkg.sub`` for ``sub/__init__.py``)."""
    out = {}
    for path in sorted(package.rglob('*.py')):
        parts = list(path.relative_to(package.parent).with_suffix('').parts)
        if parts[-1] == '__init__':
            parts.pop()
        out['.'.join(parts)] = path
    return out


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def functions(package: Path = PACKAGE) -> Iterator[Function]:
    """Every function and method, with its length in lines (decorators and docstring included)."""
    for name, path in modules(package).items():
        for node in ast.walk(_tree(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                yield Function(name, node.name, node.end_lineno - start + 1, ast.get_docstring(node) or '')


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ''
    base = importer.split('.')
    if not is_package:
        base = base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return '.'.join(base + ([node.module] if node.module else []))


def imports(package: Path = PACKAGE) -> List[Import]:
    """Every import of a package module by a package module, at any depth (lazy imports count).

    ``from a import b`` where ``a.b`` is a module is an import of ``a.b``; otherwise of ``a``.
    """
    mods = modules(package)
    root = package.name
    out = []
    for importer, path in mods.items():
        is_package = path.name == '__init__.py'
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == root or alias.name.startswith(root + '.'):
                        out.append(Import(importer, alias.name, ('*',), node.lineno))
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(importer, is_package, node)
                if source != root and not source.startswith(root + '.'):
                    continue
                plain = []
                for alias in node.names:
                    sub = f'{source}.{alias.name}'
                    if sub in mods:
                        out.append(Import(importer, sub, ('*',), node.lineno))
                    else:
                        plain.append(alias.name)
                if plain:
                    out.append(Import(importer, source, tuple(plain), node.lineno))
    return out


def import_graph(package: Path = PACKAGE) -> Dict[str, Set[str]]:
    graph: Dict[str, Set[str]] = {m: set() for m in modules(package)}
    for imp in imports(package):
        if imp.target != imp.importer:
            graph[imp.importer].add(imp.target)
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def private_imports(package: Path = PACKAGE) -> List[Import]:
    """Imports of another module's underscore names (``from .x import _helper``)."""
    return [imp for imp in imports(package)
            if any(n.startswith('_') and not n.startswith('__') for n in imp.names)]


def line_counts(package: Path = PACKAGE) -> Dict[str, int]:
    return {name: len(path.read_text().splitlines()) for name, path in modules(package).items()}


def report(package: Path = PACKAGE) -> str:
    counts = line_counts(package)
    folders: Dict[str, int] = {}
    for name, path in modules(package).items():
        folder = str(path.parent.relative_to(package.parent))
        folders[folder] = folders.get(folder, 0) + 1
    longest = max(functions(package), key=lambda f: f.lines)
    largest = max(counts, key=counts.get)
    lines = [f'modules per folder: {folders}',
             f'largest module: {largest} ({counts[largest]} lines)',
             f'longest function: {longest.module}.{longest.name} ({longest.lines} lines)',
             f'functions over 80 lines: {sorted(f"{f.module}.{f.name} ({f.lines})" for f in functions(package) if f.lines > 80)}',
             f'import cycles: {cycles(import_graph(package))}',
             f'private imports: {[f"{i.importer} <- {i.target}: {i.names}" for i in private_imports(package)]}']
    return '\n'.join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    print(report(Path(argv[0]).resolve() if argv else PACKAGE))


if __name__ == '__main__':
    main()
