"""The package's shape: imports flow one way, every module imports on its own, light entry points stay light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import schce

SRC = Path(schce.__file__).parent
HEAVY = ("torch", "lightning", "scvi", "scanpy")

# Layers, lowest first: a module may import its own layer and those below, never one above (function-local and
# type-checking imports included). docs/architecture.md shows the same map.
LAYERS = [
    {
        "schce._benchmarking",
        "schce._checks",
        "schce._cl_history",
        "schce._constants",
        "schce._graph",
        "schce._io",
        "schce._keys",
        "schce._memory",
        "schce._model_file",
        "schce._output",
        "schce._sctab",
        "schce._settings",
        "schce._simulate",
        "schce.datasets",
        "schce.evaluation",
        "schce.hierarchy",
        "schce.metrics",
        "schce.ontology",
        "schce.vocabulary",
        "schce.voting",
    },
    {"schce.nn", "schce.losses"},
    {"schce.data"},
    {"schce.train"},
    {"schce.model"},
    {"schce.pl", "schce.cli", "schce._demo", "schce._prediction_figures", "schce"},
]


def _modules() -> list[str]:
    names = []
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _layer(module: str) -> int:
    for level, members in enumerate(LAYERS):
        if any(module == m or module.startswith(m + ".") for m in members if m != "schce") or module in members:
            return level
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and docs/architecture.md")


def _imports(module: str) -> list[tuple[str, int]]:
    """Every ``schce`` module ``module`` imports anywhere in its file, with the line."""
    path = SRC.parent / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = SRC.parent / module.replace(".", "/") / "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "schce"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "schce":
            if node.module == "schce":
                # ``from schce import x``: the submodule x, or a root attribute (only __version__ is allowed)
                found += [
                    (f"schce.{a.name}" if a.name != "__version__" else "schce._constants", node.lineno)
                    for a in node.names
                ]
            else:
                found.append((node.module, node.lineno))
    return found


def test_every_module_is_in_a_layer():
    for module in _modules():
        _layer(module)


def test_imports_flow_one_way():
    upward = []
    for module in _modules():
        level = _layer(module)
        for target, line in _imports(module):
            if _layer(target) > level:
                upward.append(f"{module}:{line} imports {target}")
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_nothing_below_the_model_imports_it():
    for module in _modules():
        if _layer(module) < _layer("schce.model"):
            assert not [t for t, _ in _imports(module) if t.startswith("schce.model")], module


def test_every_module_imports_alone_in_layer_order():
    """Each module imports in a fresh interpreter after its lower layers: no module depends on import order."""
    ordered = sorted(_modules(), key=_layer)
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    result = subprocess.run([sys.executable, "-c", code, *ordered], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def _heavy_after(code: str) -> list[str]:
    probe = f"import sys\n{code}\nprint('HEAVY:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("HEAVY:"))
    return [m for m in line.removeprefix("HEAVY:").split(",") if m]


_HELP = "from schce.cli import cli\ntry:\n    cli.main({args}, standalone_mode=False)\nexcept SystemExit:\n    pass"


@pytest.mark.parametrize(
    "code",
    [
        "import schce",
        "import schce.hierarchy",
        "import schce.ontology",
        "from schce import Hierarchy, load_cell_ontology, metrics, evaluation",
        # the command line's --help, as `schce --help` runs it
        _HELP.format(args="['--help']"),
        _HELP.format(args="['train', '--help']"),
    ],
)
def test_light_entry_points_do_not_load_heavy_libraries(code):
    assert _heavy_after(code) == []


def test_lazy_names_load_on_use():
    assert "torch" in _heavy_after("import schce\nschce.HCEClassifier")
    assert set(schce.__all__) >= {"HCEClassifier", "Hierarchy", "data", "nn", "train", "pl", "metrics"}
    assert schce.data.AnnDataModule is not None and schce.train.TrainConfig is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        schce.nope  # noqa: B018


# Size limits: a file is read whole, a function at once. Docstrings do not count towards a function's length (they
# are what a reader wants more of); a longer function says why with ``# long: <reason>`` on its def line.
MAX_FILE_LINES = 520
MAX_FUNCTION_LINES = 80


def _function_lengths(path: Path) -> list[tuple[str, int, int, str]]:
    """``(name, def line, lines without the docstring, def line text)`` of every function in ``path``."""
    text = path.read_text()
    lines = text.splitlines()
    found = []
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        length = node.end_lineno - node.lineno + 1
        first = node.body[0]
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
            length -= first.end_lineno - first.lineno + 1
        found.append((node.name, node.lineno, length, lines[node.lineno - 1]))
    return found


def test_no_file_is_too_long():
    long = {
        str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES
    }
    assert not long, f"split these files along a seam (at most {MAX_FILE_LINES} lines): {long}"


def test_no_function_is_too_long_without_a_reason():
    long = [
        f"{path.relative_to(SRC)}:{line} {name} ({length} lines)"
        for path in sorted(SRC.rglob("*.py"))
        for name, line, length, text in _function_lengths(path)
        if length > MAX_FUNCTION_LINES and "# long:" not in text
    ]
    assert not long, f"split these into named helpers, or say why on the def line (# long: ...): {long}"


def test_the_size_checks_can_fail(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    path = tmp_path / "m.py"
    path.write_text(f'def f():\n    """Doc.\n\n    More.\n    """\n{body}\n\n\ndef g():  # long: a table\n{body}\n')
    lengths = {name: (length, text) for name, _, length, text in _function_lengths(path)}
    assert lengths["f"][0] == MAX_FUNCTION_LINES + 1 and "# long:" not in lengths["f"][1]  # the docstring is free
    assert "# long:" in lengths["g"][1]
