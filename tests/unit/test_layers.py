"""The module map of style.md section 2, enforced: every forkserver import edge must be listed.

Imports are read with ``ast`` (nothing is imported), including imports inside functions and under
``TYPE_CHECKING``: a lazy or type-only import is still a dependency of the module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "forkserver"

# module -> the modules it may import. "http" as a target means any forkserver.http.* module.
# Keys are dotted paths below the package; the two package initialisers are spelled as files.
ALLOWED: dict[str, set[str]] = {
    "cli": {"config", "loader", "master", "logs"},
    "config": set(),
    "loader": set(),
    "master": {"sockets", "systemd", "scoreboard", "logs", "loader", "worker", "metrics"},
    "worker": {"http", "wsgi", "scoreboard", "logs", "config"},  # config: the Settings type
    "http.parser": {"http.errors"},
    "http.response": {"http.errors"},
    "http.errors": set(),
    "wsgi": {"http", "proxy"},
    "proxy": set(),
    "scoreboard": set(),
    "sockets": set(),
    "systemd": set(),
    "logs": set(),
    "demo": set(),
    "metrics": {"scoreboard", "http.parser"},
    "__main__": {"cli"},
    "__init__": set(),
    "http/__init__": set(),
}


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


def allowed(source: str, target: str) -> bool:
    permitted = ALLOWED.get(source, set())
    if target in permitted:
        return True
    is_http = target.startswith("http.") or target == "http/__init__"
    return is_http and "http" in permitted


def layer_violations(package: Path) -> list[str]:
    files = sorted(package.rglob("*.py"))
    modules = {module_key(package, f) for f in files}
    problems = []
    for file in files:
        source = module_key(package, file)
        if source not in ALLOWED:
            problems.append(f"{source}: not in the module table (style.md section 2)")
            continue
        for target in sorted(imports_of(package, file, modules)):
            if not allowed(source, target):
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
        ("metrics.py", "from forkserver.http import response\n", "metrics imports http.response"),
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
