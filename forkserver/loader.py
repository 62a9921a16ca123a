"""Turn "module:callable" strings into objects: the WSGI app and config hooks.

A spec names a module and, after a colon, a dotted attribute path, optionally called once
("module:create_app(debug=True)"). The call's arguments are parsed with ``ast`` and accepted only
as literals, so a config file can choose a factory's arguments without being able to run code.

Every failure becomes one ``LoadError`` line naming the culprit (module, attribute, file and
line), because the same message is shown by --check-config, at boot and on a failed reload, where
a traceback would bury it. The original exception is chained for ``--log-level debug``.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import re
import traceback
from collections.abc import Callable
from typing import Any

_MODULE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", re.ASCII)
# A bare module spec looks for these, in order (the PEP 3333 name first, then the common one).
_DEFAULT_NAMES = ("application", "app")


class LoadError(Exception):
    """An app or hook spec that cannot be turned into a callable; ``str()`` is one line."""


def load_app(spec: str) -> Callable[..., Any]:
    """Import and return the WSGI application named by ``spec``.

    Forms: "module:attr", "module:obj.attr", "module:factory()", "module:factory(1, key='v')",
    and "module" alone, which means its ``application``, else its ``app``.
    """
    return _load(spec, what="application spec", allow_call=True, allow_bare=True)


def load_hook(spec: str) -> Callable[..., Any]:
    """Import and return a hook function named "module:function" (no call, no bare module)."""
    return _load(spec, what="hook spec", allow_call=False, allow_bare=False)


def _load(spec: str, *, what: str, allow_call: bool, allow_bare: bool) -> Callable[..., Any]:
    if not isinstance(spec, str):
        raise LoadError(f"invalid {what} {spec!r}: expected a string")
    spec = spec.strip()
    module_name, colon, target = spec.partition(":")
    if not _MODULE.fullmatch(module_name) or (colon and not target.strip()):
        raise LoadError(f"invalid {what} {spec!r}: expected module:name")
    if not colon and not allow_bare:
        raise LoadError(f"invalid {what} {spec!r}: expected module:name")

    path: list[str] = []
    call = None
    if colon:
        path, call = _parse_target(spec, target, what, allow_call)
    module = _import(module_name)

    if not colon:
        for name in _DEFAULT_NAMES:
            if hasattr(module, name):
                obj = getattr(module, name)
                label = f"{module_name}:{name}"
                break
        else:
            names = " or ".join(repr(n) for n in _DEFAULT_NAMES)
            raise LoadError(f"module {module_name!r} has no attribute {names}")
    else:
        obj = _walk(module, module_name, path)
        label = f"{module_name}:{'.'.join(path)}"
        if call is not None:
            if not callable(obj):
                raise LoadError(f"{label!r} is not callable (it is {_type_name(obj)})")
            args, kwargs = call
            try:
                obj = obj(*args, **kwargs)
            except Exception as exc:
                raise LoadError(f"factory {spec!r} failed: {_describe(exc)}") from exc
            label = spec

    if not callable(obj):
        raise LoadError(f"{label!r} is not callable (it is {_type_name(obj)})")
    return obj


def _parse_target(
    spec: str, target: str, what: str, allow_call: bool
) -> tuple[list[str], tuple[list[Any], dict[str, Any]] | None]:
    """Split "obj.attr" or "factory(args)" into an attribute path and the literal arguments."""
    bad = f"invalid {what} {spec!r}"
    try:
        node = ast.parse(target.strip(), mode="eval").body
    except SyntaxError:
        raise LoadError(f"{bad}: expected module:name or module:factory(...)") from None
    call = None
    if isinstance(node, ast.Call):
        if not allow_call:
            raise LoadError(f"{bad}: a hook is named, not called")
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        for arg in node.args:
            args.append(_literal(arg, bad))
        for keyword in node.keywords:
            if keyword.arg is None:
                raise LoadError(f"{bad}: **arguments are not supported")
            kwargs[keyword.arg] = _literal(keyword.value, bad)
        call = (args, kwargs)
        node = node.func
    path: list[str] = []
    while isinstance(node, ast.Attribute):
        path.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        raise LoadError(f"{bad}: expected module:name or module:factory(...)")
    path.append(node.id)
    path.reverse()
    return path, call


def _literal(node: ast.expr, bad: str) -> Any:
    if isinstance(node, ast.Starred):
        raise LoadError(f"{bad}: *arguments are not supported")
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise LoadError(f"{bad}: factory arguments must be literals") from None


def _import(module_name: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except SyntaxError as exc:  # includes IndentationError and TabError
        # The traceback of a SyntaxError points into importlib; the file and line are fields.
        where = f"{exc.filename}, line {exc.lineno}" if exc.filename else f"line {exc.lineno}"
        message = _one_line(f"{type(exc).__name__} in {where}: {exc.msg}")
        raise LoadError(f"cannot import module {module_name!r} ({message})") from exc
    except ImportError as exc:
        hint = ""
        if module_name.endswith(".py"):
            hint = f" (use the module name: {module_name[:-3]!r})"
        message = _one_line(f"{type(exc).__name__}: {exc}")
        raise LoadError(f"cannot import module {module_name!r} ({message}){hint}") from exc
    except (Exception, SystemExit) as exc:
        # SystemExit too: an app that calls sys.exit() while importing must not end
        # --check-config or the master with its own status and no explanation.
        raise LoadError(f"cannot import module {module_name!r} ({_describe(exc)})") from exc


def _walk(module: Any, module_name: str, path: list[str]) -> Any:
    obj = module
    for depth, name in enumerate(path):
        try:
            obj = getattr(obj, name)
        except AttributeError:
            if depth == 0:
                owner = f"module {module_name!r}"
            else:
                owner = repr(f"{module_name}:{'.'.join(path[:depth])}")
            candidates = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(name, candidates, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise LoadError(f"{owner} has no attribute {name!r}{hint}") from None
        except Exception as exc:  # a property or module __getattr__ that blew up
            label = f"{module_name}:{'.'.join(path[: depth + 1])}"
            raise LoadError(f"looking up {label!r} failed: {_describe(exc)}") from exc
    return obj


def _describe(exc: BaseException) -> str:
    """ "Type: message at file:line", pointing at the innermost frame, where it was raised."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    # Frames of this module only say "the loader called it"; an error raised right there (a
    # factory called with the wrong arguments) gets no location rather than a misleading one.
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename != __file__]
    if frames:
        text += f" at {frames[-1].filename}:{frames[-1].lineno}"
    return _one_line(text)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _type_name(obj: object) -> str:
    name = type(obj).__name__
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return f"{article} {name}"
