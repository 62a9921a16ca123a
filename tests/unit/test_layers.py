"""The module map of docs/architecture.md, enforced: every forkserver import edge must be listed.

The allowed edges are read from the table between the ``module-map`` markers in
docs/architecture.md (one home for the map). Imports are read with ``ast`` (nothing is
imported), including imports inside functions and under ``TYPE_CHECKING``: a lazy or type-only
import is still a dependency of the module. A module listed in the table but not yet written is
fine; a module written but not listed is not.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "forkserver"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
BEGIN, END = "<!-- module-map:begin -->", "<!-- module-map:end -->"
NAME = re.compile(r"`([A-Za-z_][\w./]*)`")


def read_module_map(text: str) -> dict[str, set[str]]:
    """module -> the modules it may import, from the markdown table between the markers.

    Keys are dotted paths below the package ("http.parser"); the two package initialisers are
    spelled as files ("__init__", "http/__init__"). "http" as a target means any forkserver.http
    module. Columns: module, responsibility, may import ("—" for nothing).
    """
    if BEGIN not in text or END not in text:
        raise ValueError(f"no module map between {BEGIN} and {END}")
    block = text.split(BEGIN, 1)[1].split(END, 1)[0]
    rows = [line for line in block.splitlines() if line.startswith("|")]
    table: dict[str, set[str]] = {}
    for row in rows[2:]:  # past the header and the |---| line
        cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
        if len(cells) != 3:
            raise ValueError(f"module map row needs 3 cells: {row!r}")
        names = NAME.findall(cells[0])
        if len(names) != 1:
            raise ValueError(f"module map row must name one module: {row!r}")
        if names[0] in table:
            raise ValueError(f"module {names[0]} listed twice")
        targets = set(NAME.findall(cells[2]))
        if not targets and cells[2] not in ("—", "-", ""):
            raise ValueError(f"unreadable import list for {names[0]}: {cells[2]!r}")
        table[names[0]] = targets
    if not table:
        raise ValueError("the module map is empty")
    return table


ALLOWED: dict[str, set[str]] = read_module_map(ARCHITECTURE.read_text(encoding="utf-8"))


def module_key(package: Path, file: Path) -> str:
    """forkserver/http/parser.py -> "http.parser"; its __init__.py -> "http/__init__"."""
    parts = list(file.relative_to(package).with_suffix("").parts)
    if parts[-1] == "__init__":
        return "/".join(parts)
    return ".".join(parts)


def dotted_to_key(dotted: str, modules: set[str]) -> str:
    """An absolute name below the package ("http" or "http.parser") -> a table key."""
    if dotted == "":
        return "__init__"
    if dotted in modules:
        return dotted
    if f"{dotted.replace('.', '/')}/__init__" in modules:
        return f"{dotted.replace('.', '/')}/__init__"
    return dotted  # not (yet) a file in the tree; still judged by its name


def imports_of(package: Path, file: Path, modules: set[str]) -> set[str]:
    """The table keys of every forkserver module that ``file`` imports."""
    name = package.name
    key = module_key(package, file)
    is_init = key.endswith("__init__")
    # The package a relative import in this file starts from, as parts below `name`.
    here = key.split("/")[:-1] if is_init else key.split(".")[:-1]
    targets: set[str] = set()
    tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == name or alias.name.startswith(name + "."):
                    targets.add(dotted_to_key(alias.name[len(name) + 1:], modules))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level - 1 > len(here):
                    raise ValueError(f"{file}: relative import beyond the package")
                base = here[: len(here) - (node.level - 1)]
                if node.module:
                    base = base + node.module.split(".")
            elif node.module == name or (node.module or "").startswith(name + "."):
                base = node.module.split(".")[1:]
            else:
                continue
            base_dotted = ".".join(base)
            for alias in node.names:
                # `from forkserver import config` imports a module; `from forkserver.http
                # import Parser` imports a name from the package itself.
                candidate = ".".join([*base, alias.name])
                if candidate in modules or f"{candidate.replace('.', '/')}/__init__" in modules:
                    targets.add(dotted_to_key(candidate, modules))
                else:
                    targets.add(dotted_to_key(base_dotted, modules))
    targets.discard(key)
    return targets


def allowed(source: str, target: str, table: dict[str, set[str]]) -> bool:
    permitted = table.get(source, set())
    if target in permitted:
        return True
    is_http = target.startswith("http.") or target == "http/__init__"
    return is_http and "http" in permitted


def layer_violations(package: Path, table: dict[str, set[str]] | None = None) -> list[str]:
    table = ALLOWED if table is None else table
    files = sorted(package.rglob("*.py"))
    modules = {module_key(package, f) for f in files}
    problems = []
    for file in files:
        source = module_key(package, file)
        if source not in table:
            problems.append(f"{source}: not in the module table (docs/architecture.md)")
            continue
        for target in sorted(imports_of(package, file, modules)):
            if not allowed(source, target, table):
                problems.append(f"{source} imports {target}, which the module table forbids")
    return problems


def test_forkserver_imports_follow_the_module_table():
    problems = layer_violations(PACKAGE)
    assert problems == [], "\n".join(problems)


def test_the_real_tree_has_the_expected_edges():
    """Guard against a checker that silently finds nothing."""
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_key(PACKAGE, f) for f in files}
    assert imports_of(PACKAGE, PACKAGE / "__main__.py", modules) == {"cli"}
    assert {"config", "loader", "master"} <= imports_of(PACKAGE, PACKAGE / "cli.py", modules)


def write_tree(root: Path, files: dict[str, str]) -> Path:
    package = root / "forkserver"
    for relative, source in files.items():
        path = package / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return package


@pytest.fixture
def fake_tree(tmp_path):
    return write_tree(
        tmp_path,
        {
            "__init__.py": "",
            "http/__init__.py": "",
            "http/errors.py": "",
            "http/parser.py": "from .errors import HTTPError\n",
            "http/response.py": "from . import errors\n",
            "config.py": "import os\n",
            "loader.py": "",
            "master.py": "",
            "logs.py": "",
            "wsgi.py": "from forkserver.http.parser import Request\nimport forkserver.http\n",
            "cli.py": (
                "from forkserver import config, loader\n"
                "def main():\n    from forkserver.master import Master\n"
            ),
            "worker.py": "from .http import parser\nfrom forkserver.http import errors\n",
            "metrics.py": "from forkserver.http.parser import Request\n",
        },
    )


def test_checker_accepts_a_tree_that_follows_the_table(fake_tree):
    assert layer_violations(fake_tree) == []


@pytest.mark.parametrize(
    "relative, source, expected",
    [
        ("config.py", "from forkserver import master\n", "config imports master"),
        ("config.py", "from . import loader\n", "config imports loader"),
        ("config.py", "import forkserver.wsgi as w\n", "config imports wsgi"),
        ("loader.py", "def f():\n    import forkserver.config\n", "loader imports config"),
        ("http/parser.py", "from ..wsgi import environ\n", "http.parser imports wsgi"),
        ("http/parser.py", "from .response import Response\n", "http.parser imports http.response"),
        (
            "http/errors.py", "from forkserver.http import parser\n",
            "http.errors imports http.parser",
        ),
        ("metrics.py", "from forkserver import wsgi\n", "metrics imports wsgi"),
        ("supervision.py", "import forkserver.metrics\n", "supervision imports metrics"),
        ("master.py", "from forkserver.http.parser import P\n", "master imports http.parser"),
        ("master.py", "from forkserver import wsgi\n", "master imports wsgi"),
        ("cli.py", "from forkserver import __version__\n", "cli imports __init__"),
        ("wsgi.py", "import forkserver\n", "wsgi imports __init__"),
        (
            "http/__init__.py", "from .parser import RequestParser\n",
            "http/__init__ imports http.parser",
        ),
        (
            "logs.py",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import forkserver.config\n",
            "logs imports config",
        ),
        ("extra.py", "", "extra: not in the module table"),
        ("http/extra.py", "", "http.extra: not in the module table"),
    ],
)
def test_checker_reports_forbidden_edges_and_unknown_modules(fake_tree, relative, source, expected):
    path = fake_tree / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    problems = layer_violations(fake_tree)
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected)


def test_imports_outside_the_package_are_ignored(fake_tree):
    (fake_tree / "config.py").write_text("import forkserverx\nfrom forkserver_extra import y\n")
    assert layer_violations(fake_tree) == []


def test_the_map_lists_planned_modules_that_do_not_exist_yet():
    """A listed module with no file yet is allowed, and its row is ready for when it lands."""
    planned = {"addresses", "pool", "supervision", "generations", "tls", "proxy_protocol"}
    assert planned <= set(ALLOWED)
    assert ALLOWED["supervision"] == {"pool", "scoreboard"}
    assert "worker" in ALLOWED["pool"] and "pool" in ALLOWED["master"]
    assert ALLOWED["addresses"] == set()
    assert "addresses" in ALLOWED["config"] & ALLOWED["sockets"] & ALLOWED["metrics"]
    assert {"proxy_protocol", "tls"} <= ALLOWED["worker"]
    for http_module in ("http.parser", "http.response", "http.errors", "http/__init__"):
        assert all(target.startswith("http") for target in ALLOWED[http_module])


def test_a_new_module_from_the_map_passes_and_may_use_its_edges(fake_tree):
    (fake_tree / "supervision.py").write_text("from forkserver.scoreboard import State\n")
    (fake_tree / "scoreboard.py").write_text("")
    assert layer_violations(fake_tree) == []
    (fake_tree / "supervision.py").write_text("from forkserver import worker\n")
    assert layer_violations(fake_tree) == [
        "supervision imports worker, which the module table forbids"
    ]


@pytest.mark.parametrize(
    "text, problem",
    [
        ("no markers here", "no module map"),
        (f"{BEGIN}\n| module | r | may import |\n|---|---|---|\n{END}", "empty"),
        (f"{BEGIN}\n| m | r | i |\n|---|---|---|\n| `a` | x |\n{END}", "3 cells"),
        (f"{BEGIN}\n| m | r | i |\n|---|---|---|\n| `a` | x | — |\n| `a` | y | — |\n{END}",
         "twice"),
        (f"{BEGIN}\n| m | r | i |\n|---|---|---|\n| `a` | x | config |\n{END}", "unreadable"),
    ],
)
def test_a_broken_map_is_an_error_not_an_empty_allowance(text, problem):
    with pytest.raises(ValueError, match=problem):
        read_module_map(text)


def test_the_map_reads_modules_and_targets():
    text = (f"intro\n{BEGIN}\n| module | responsibility | may import |\n|---|---|---|\n"
            f"| `cli` | argv | `config`, `master` |\n| `http.parser` | p | `http.errors` |\n"
            f"| `demo` | app | — |\n{END}\n| `ignored` | after | `x` |\n")
    assert read_module_map(text) == {"cli": {"config", "master"}, "http.parser": {"http.errors"},
                                     "demo": set()}


def test_importing_the_server_brings_no_module_it_imports_only_where_used():
    """The modules a default server never needs stay out of the master, so out of every worker
    it forks (architecture.md, "What a worker inherits"); importing them lazily is the rule."""
    lazy = ("ctypes", "psutil", "importlib.metadata", "email", "zipfile", "csv", "tempfile")
    code = ("import sys, forkserver.cli, forkserver.master, forkserver.worker; "
            f"print(*[name for name in {lazy!r} if name in sys.modules])")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=False)
    assert (run.returncode, run.stdout.strip(), run.stderr) == (0, "", "")
