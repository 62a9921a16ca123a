"""The ``forkserver`` command: argv to Settings, the one-shot actions, then the master.

User errors (bad settings, an app that does not import) end here as one line on stderr and a
non-zero exit status: 2 for configuration and usage errors, 1 when --check-config finds that the
app does not load. A traceback is added only with ``--log-level debug``, because for these errors
the line names the culprit and the traceback would mostly show forkserver's own frames.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Mapping
from importlib import metadata
from typing import Any

from forkserver import config, loader

EXIT_USAGE = 2
EXIT_LOAD = 1


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``) and return the exit status."""
    args = sys.argv[1:] if argv is None else list(argv)
    cwd = os.getcwd()
    namespace: argparse.Namespace | None = None
    try:
        namespace = config.parse_args(args)
        if namespace.version:
            # Before reading any config, so --version works even where the config is broken.
            print(f"forkserver {_version()}")
            return 0
        overrides = config.cli_overrides(namespace)
        settings = config.resolve(overrides, namespace.config, os.environ, cwd)
    except config.ConfigError as exc:
        return _fail(exc, EXIT_USAGE, _debug_requested(namespace, os.environ))
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0

    if namespace.print_config:
        print(config.to_toml(settings), end="")
        return 0

    debug = settings.log_level == "debug"
    try:
        _prepare_imports(settings)
    except config.ConfigError as exc:
        return _fail(exc, EXIT_USAGE, debug)

    if namespace.check_config:
        try:
            loader.load_app(settings.app)
        except loader.LoadError as exc:
            return _fail(exc, EXIT_LOAD, debug)
        print(f"forkserver: config ok, app {settings.app} loads")
        return 0

    # Imported here so that the one-shot actions above never pay for (or depend on) the
    # server machinery.
    from forkserver.master import Master

    config_file = namespace.config

    def reload() -> Any:
        # A HUP re-reads the file and the environment, but the command line cannot change
        # after start, so the same overrides are applied on top again.
        return config.resolve(overrides, config_file, os.environ, cwd)

    return Master(settings, reload=reload).run()


def _version() -> str:
    try:
        return metadata.version("forkserver")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def _prepare_imports(settings: Any) -> None:
    """Apply ``chdir`` and ``pythonpath`` and put the working directory first on sys.path.

    The console script's sys.path[0] is its bin directory, not the directory it was started
    from, so without this ``forkserver myapp:app`` would not find ./myapp.py.
    """
    chdir = settings.chdir
    if chdir:
        try:
            os.chdir(chdir)
        except OSError as exc:
            raise config.ConfigError(f"chdir = {chdir!r}: {exc.strerror}") from None
    here = os.getcwd()
    extra = [p.strip() for p in settings.pythonpath.split(",") if p.strip()]
    for path in reversed([here, *(os.path.abspath(p) for p in extra)]):
        if path in sys.path:
            sys.path.remove(path)
        sys.path.insert(0, path)


def _debug_requested(namespace: argparse.Namespace | None, environ: Mapping[str, str]) -> bool:
    """Whether the user asked for debug, judged before the settings could be resolved."""
    level = getattr(namespace, "log_level", None) or environ.get("FORKSERVER_LOG_LEVEL", "")
    return level.strip().lower() == "debug"


def _fail(exc: Exception, status: int, debug: bool) -> int:
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    print(f"forkserver: error: {exc}", file=sys.stderr)
    return status
