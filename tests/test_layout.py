"""The package's shape (the redesign's rules): no import cycles, no private cross-module imports,
small modules and functions, a user-facing top-level API, no library default writing into the
repository's record folders."""
import ast
import importlib

import pytest

import package_layout
import timm_bcos

SUBPACKAGES = ('convert', 'data', 'evaluation', 'explain', 'layers', 'models', 'training', 'weights', 'app', 'cli')
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def test_no_import_cycles():
    assert package_layout.cycles(package_layout.import_graph()) == []


def test_cycle_finder_finds_cycles():
    assert package_layout.cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c']]


def test_no_module_imports_another_modules_private_names():
    assert [f'{i.importer}:{i.line} imports {i.names} from {i.target}' for i in package_layout.private_imports()] == []


def test_modules_are_small():
    assert {m: n for m, n in package_layout.line_counts().items() if n > MAX_MODULE_LINES} == {}


def test_long_functions_say_why():
    """A function over 80 lines needs a docstring paragraph starting with 'Long:' (the reason)."""
    long = [f'{f.module}.{f.name} ({f.lines} lines)' for f in package_layout.functions()
            if f.lines > MAX_FUNCTION_LINES and 'Long:' not in f.docstring]
    assert long == []


@pytest.mark.parametrize('name', SUBPACKAGES)
def test_subpackages_export_their_public_names(name):
    module = importlib.import_module(f'timm_bcos.{name}')
    assert module.__doc__ and module.__all__
    assert [n for n in module.__all__ if not hasattr(module, n)] == []


def test_top_level_api():
    import timm

    assert [n for n in timm_bcos.__all__ if not hasattr(timm_bcos, n)] == []
    assert len(set(timm_bcos.__all__)) == len(timm_bcos.__all__)
    shadowed = {n for n in timm_bcos.__all__ if callable(getattr(timm, n, None))}
    assert shadowed == set(), f'timm_bcos exports names of timm functions: {shadowed}'
    for name in ('convert_to_bcos', 'explain', 'Explanation', 'BcosConv2d', 'AddInverse', 'create_transform',
                 'load_model', 'publish', 'UnsupportedModuleError', 'PretrainedWeightsError'):
        assert name in timm_bcos.__all__


def _defaults(tree: ast.AST):
    """String constants given as defaults: function argument defaults and ``default=`` keywords."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            values = node.args.defaults + [d for d in node.args.kw_defaults if d is not None]
        elif isinstance(node, ast.Call):
            values = [k.value for k in node.keywords if k.arg == 'default']
        else:
            continue
        for value in values:
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                yield value.lineno, value.value


def test_no_default_writes_into_the_record_folders():
    """conversion/ and hub_cards/ are written only by commands that name them (e.g. --out conversion/...)."""
    found = [f'{module}:{line}: {value!r}' for module, path in package_layout.modules().items()
             for line, value in _defaults(ast.parse(path.read_text()))
             if value.strip('./').startswith(('conversion', 'hub_cards'))]
    assert found == []
