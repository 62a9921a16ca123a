"""App and hook specs: every accepted form, and a one-line error for every way to get it wrong."""

from __future__ import annotations

import itertools
import sys
import textwrap
from pathlib import Path

import pytest

from forkserver.loader import LoadError, load_app, load_hook

APPS = Path(__file__).resolve().parents[1] / "apps"
_counter = itertools.count()


@pytest.fixture
def make_module(tmp_path, monkeypatch):
    """Write a module under a fresh name on a temporary sys.path entry; forget it afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    created: list[str] = []

    def make(source: str) -> str:
        name = f"loader_fixture_{next(_counter)}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source), encoding="utf-8")
        created.append(name)
        return name

    yield make
    for name in created:
        sys.modules.pop(name, None)


def load_error(spec: str, load=load_app) -> str:
    with pytest.raises(LoadError) as info:
        load(spec)
    message = str(info.value)
    assert "\n" not in message
    return message


APP_SOURCE = """
    def app(environ, start_response):
        return [b"app"]

    def application(environ, start_response):
        return [b"application"]

    class Holder:
        def wsgi(self, environ, start_response):
            return [b"holder"]

    holder = Holder()
    not_callable = 42

    def create_app(greeting="hi", *, times=1):
        def made(environ, start_response):
            return [greeting.encode() * times]
        return made

    def broken_factory():
        raise ValueError("no database")

    def returns_none():
        return None
"""


def body(app) -> bytes:
    return b"".join(app({}, lambda *a: None))


def test_module_colon_attribute(make_module):
    name = make_module(APP_SOURCE)
    assert body(load_app(f"{name}:app")) == b"app"


def test_bare_module_prefers_application_then_app(make_module):
    both = make_module(APP_SOURCE)
    assert body(load_app(both)) == b"application"
    only_app = make_module("def app(environ, start_response):\n    return [b'only']\n")
    assert body(load_app(only_app)) == b"only"


def test_bare_module_without_either_name(make_module):
    name = make_module("x = 1\n")
    assert load_error(name) == f"module '{name}' has no attribute 'application' or 'app'"


def test_dotted_attribute(make_module):
    name = make_module(APP_SOURCE)
    assert body(load_app(f"{name}:holder.wsgi")) == b"holder"


def test_dotted_module_from_a_package():
    assert load_app("forkserver.loader:load_app") is load_app


def test_factory_is_called_once_without_arguments(make_module):
    name = make_module(APP_SOURCE)
    assert body(load_app(f"{name}:create_app()")) == b"hi"


def test_factory_with_literal_arguments(make_module):
    name = make_module(APP_SOURCE)
    app = load_app(f"{name}:create_app('yo', times=2)")
    assert body(app) == b"yoyo"


def test_factory_arguments_are_never_evaluated(make_module, tmp_path):
    name = make_module(APP_SOURCE)
    marker = tmp_path / "ran"
    spec = f"{name}:create_app(open({str(marker)!r}, 'w'))"
    message = load_error(spec)
    assert message == f"invalid application spec {spec!r}: factory arguments must be literals"
    assert not marker.exists()


def test_factory_that_raises(make_module):
    name = make_module(APP_SOURCE)
    message = load_error(f"{name}:broken_factory()")
    assert message.startswith(
        f"factory '{name}:broken_factory()' failed: ValueError: no database at "
    )
    assert message.endswith(f"{name}.py:21")


def test_factory_called_with_wrong_arguments_has_no_misleading_location(make_module):
    name = make_module(APP_SOURCE)
    message = load_error(f"{name}:create_app(1, 2, 3)")
    assert message.startswith(f"factory '{name}:create_app(1, 2, 3)' failed: TypeError: ")
    assert "loader.py" not in message


def test_factory_result_must_be_callable(make_module):
    name = make_module(APP_SOURCE)
    assert load_error(f"{name}:returns_none()") == (
        f"'{name}:returns_none()' is not callable (it is a NoneType)"
    )


def test_missing_module():
    assert load_error("no_such_module_qq:app") == (
        "cannot import module 'no_such_module_qq' "
        "(ModuleNotFoundError: No module named 'no_such_module_qq')"
    )


def test_py_suffix_gets_a_hint():
    message = load_error("no_such_module_qq.py:app")
    assert message.endswith("(use the module name: 'no_such_module_qq')")


def test_module_whose_own_import_fails_names_both_modules():
    assert load_error("tests.apps.bad_import:app") == (
        "cannot import module 'tests.apps.bad_import' "
        "(ModuleNotFoundError: No module named 'module_that_does_not_exist_xyz')"
    )


def test_syntax_error_names_file_and_line():
    message = load_error("tests.apps.syntax_error:app")
    assert message.startswith("cannot import module 'tests.apps.syntax_error' (SyntaxError in ")
    assert f"{APPS / 'syntax_error.py'}, line 3: " in message


def test_exception_at_import_names_type_message_and_place(make_module):
    name = make_module("x = 1\nraise RuntimeError('config missing')\n")
    message = load_error(f"{name}:app")
    assert message.startswith(f"cannot import module '{name}' (RuntimeError: config missing at ")
    assert message.endswith(f"{name}.py:2)")
    assert name not in sys.modules  # a retry (the next reload) imports it afresh


def test_sys_exit_at_import_is_a_load_error(make_module):
    name = make_module("import sys\nsys.exit(3)\n")
    assert load_error(name).startswith(f"cannot import module '{name}' (SystemExit: 3 at ")


def test_missing_attribute_with_suggestion(make_module):
    name = make_module(APP_SOURCE)
    assert load_error(f"{name}:aplication") == (
        f"module '{name}' has no attribute 'aplication' (did you mean 'application'?)"
    )


def test_missing_nested_attribute(make_module):
    name = make_module(APP_SOURCE)
    assert load_error(f"{name}:holder.zzz") == f"'{name}:holder' has no attribute 'zzz'"


def test_not_callable(make_module):
    name = make_module(APP_SOURCE)
    message = load_error(f"{name}:not_callable")
    assert message == f"'{name}:not_callable' is not callable (it is an int)"


def test_calling_something_not_callable(make_module):
    name = make_module(APP_SOURCE)
    assert load_error(f"{name}:not_callable()") == (
        f"'{name}:not_callable' is not callable (it is an int)"
    )


@pytest.mark.parametrize(
    "spec",
    ["", ":app", "mod:", "mod: ", "1mod:app", "a..b:app", "mod:app(", "mod:1+1", "mod:x[0]",
     "mod:app()()", "mod:f(*args)", "mod:f(**kw)", "mod:f(x)", "./app.py:app"],
)
def test_malformed_specs(spec):
    assert load_error(spec).startswith(f"invalid application spec {spec.strip()!r}: ")


def test_whitespace_around_the_spec_is_ignored():
    assert load_app("  forkserver.loader:load_app ") is load_app


def test_load_hook(make_module):
    name = make_module("def on_starting(server):\n    return 'started'\n")
    assert load_hook(f"{name}:on_starting")(None) == "started"


@pytest.mark.parametrize("spec", ["forkserver.loader", "forkserver.loader:load_app()"])
def test_hooks_are_named_not_called_or_guessed(spec):
    assert load_error(spec, load_hook).startswith(f"invalid hook spec {spec!r}: ")


def test_hook_must_be_callable():
    assert load_error("forkserver.loader:_MODULE", load_hook) == (
        "'forkserver.loader:_MODULE' is not callable (it is a Pattern)"
    )
