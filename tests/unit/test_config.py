"""The settings table and everything derived from it: sources, precedence, errors, docs."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
import tempfile
import tomllib
import typing
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from forkserver import config

ROOT = Path(__file__).resolve().parents[2]


def load(tmp_path: Path, argv=(), env=None, toml: str | None = None, name="forkserver.toml"):
    if toml is not None:
        (tmp_path / name).write_text(toml, encoding="utf-8")
    settings, _ = config.load(list(argv), env or {}, str(tmp_path))
    return settings


def error_of(tmp_path: Path, argv=(), env=None, toml: str | None = None, name="forkserver.toml"):
    with pytest.raises(config.ConfigError) as info:
        load(tmp_path, argv, env, toml, name)
    message = str(info.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- the table


def test_table_names_flags_and_env_are_unique_and_conventional():
    names = [s.name for s in config.SETTINGS]
    assert len(names) == len(set(names))
    flags = [f for s in config.SETTINGS for f in s.flags]
    assert len(flags) == len(set(flags))
    for s in config.SETTINGS:
        assert s.name.isidentifier() and s.name == s.name.lower(), s.name
        assert s.env == "FORKSERVER_" + s.name.upper()
        assert s.help.strip().endswith("."), s.name
        if s.positional:
            assert s.flags == ()
        else:
            # The long flag is always the name with dashes, so users can guess it.
            assert "--" + s.name.replace("_", "-") in s.flags, s.name


def test_every_default_is_a_valid_value_of_its_kind():
    for s in config.SETTINGS:
        default = s.default() if callable(s.default) else s.default
        assert s.kind.from_value(default) == default, s.name


def test_settings_has_one_field_per_setting_and_is_frozen(tmp_path):
    fields = [f.name for f in dataclasses.fields(config.Settings)]
    assert fields == [s.name for s in config.SETTINGS] + ["config_file"]
    settings = load(tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.workers = 3
    assert settings.config_file is None


# What each kind's values are, for the check that every field is typed by its kind.
KIND_TYPES = {
    config.Int: int, config.Seconds: float, config.Bool: bool, config.Text: str,
    config.Choice: str, config.Hook: str, config.Address: str, config.AccessLogFormat: str,
    config.Token: str, config.TextList: tuple[str, ...], config.Umask: int | None,
    config.CountList: tuple[int, ...], config.TLSVersion: str,
}


def test_every_field_is_typed_as_its_kind_parses():
    hints = typing.get_type_hints(config.Settings)
    assert hints["config_file"] == str | None
    for s in config.SETTINGS:
        assert hints[s.name] == KIND_TYPES[type(s.kind)], s.name


def test_settings_can_be_built_from_its_field_defaults():
    # A computed default (workers) is computed when built, never at import.
    built = config.Settings()
    assert built.workers == config.usable_cpus()
    assert built.keepalive == 5.0 and built.bind == ("127.0.0.1:8000",)


def test_new_settings_defaults(tmp_path):
    settings = load(tmp_path)
    assert settings.forwarded_headers == ("X-Forwarded-For", "X-Forwarded-Proto")
    assert (settings.metrics_token, settings.status_show_query) == ("", False)
    assert (settings.error_log_format, settings.shutdown_delay) == ("text", 0.0)


def test_forwarded_headers_are_canonical_and_unknown_names_are_errors(tmp_path):
    settings = load(tmp_path, ["--forwarded-headers", "forwarded",
                               "--forwarded-headers", "x-forwarded-host"])
    assert settings.forwarded_headers == ("Forwarded", "X-Forwarded-Host")
    assert load(tmp_path, env={"FORKSERVER_FORWARDED_HEADERS": ""}).forwarded_headers == ()
    message = error_of(tmp_path, toml='forwarded_headers = ["X-Real-IP"]')
    assert message.startswith('forwarded_headers = ["X-Real-IP"] in forkserver.toml: ')
    assert "unknown forwarding header 'X-Real-IP'" in message


@pytest.mark.parametrize("token", ["a b", "tok\"en", "Bearer:x", "é"])
def test_metrics_token_must_be_a_bearer_token(tmp_path, token):
    message = error_of(tmp_path, env={"FORKSERVER_METRICS_TOKEN": token})
    assert message.startswith("metrics_token = ") and "bearer token" in message


def test_defaults(tmp_path):
    settings = load(tmp_path, env={"WEB_CONCURRENCY": "3"})
    assert settings.app == "forkserver.demo:app"
    assert settings.bind == ("127.0.0.1:8000",)
    assert settings.workers == 3
    assert settings.keepalive == 5.0 and isinstance(settings.keepalive, float)
    assert settings.limit_request_body == 100 * 1024 * 1024
    assert settings.preload is False
    assert settings.log_level == "info"
    assert settings.error_log == "-"


# ------------------------------------------------------------ every setting, every source


def sample(setting: config.Setting):
    """A valid value different from the default, per kind."""
    kind = setting.kind
    if isinstance(kind, config.Bool):
        return not setting.default
    if isinstance(kind, config.Int):
        return kind.minimum + 7
    if isinstance(kind, config.Seconds):
        return 2.5
    if isinstance(kind, config.Choice):
        return next(c for c in kind.choices if c != setting.default)
    if isinstance(kind, config.TextList):
        if setting.name in ("forwarded_allow_ips", "proxy_allow_ips"):
            return ("10.0.0.0/8", "unix")
        if setting.name == "forwarded_headers":
            return ("Forwarded", "X-Forwarded-Host")
        return ("127.0.0.1:9001", "unix:/tmp/fs.sock")
    if isinstance(kind, config.Address):
        return "127.0.0.1:9100"
    if isinstance(kind, config.AccessLogFormat):
        return "json"
    if isinstance(kind, config.Umask):
        return 0o027
    if isinstance(kind, config.Hook):
        return "pkg.hooks:on_event"
    if isinstance(kind, config.Token):
        return "s3cr3t-Token_1~"
    if isinstance(kind, config.CountList):
        return (50, 500)
    if isinstance(kind, config.TLSVersion):
        return "1.3"
    if setting.name in TLS_FILES:
        return str(tls_files()[setting.name])
    if isinstance(kind, config.Text):
        return "pkg.mod:application" if setting.name == "app" else "some dir/value.x"
    pytest.fail(f"no sample for {setting.name} of kind {kind!r}")


# TLS file settings are checked by building a context, so their samples are real files made
# by trustme, and a setting that needs a partner (a key needs a certificate) gets it from the
# environment in every source.
TLS_FILES = {"certfile", "keyfile", "ca_certs"}


@functools.cache
def tls_files() -> dict[str, Path]:
    import trustme

    folder = Path(tempfile.mkdtemp(prefix="fs-config-tls-"))
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    paths = {"certfile": folder / "combined.pem", "cert_only": folder / "cert.pem",
             "keyfile": folder / "key.pem", "ca_certs": folder / "ca.pem"}
    cert.private_key_and_cert_chain_pem.write_to_path(str(paths["certfile"]))
    cert.cert_chain_pems[0].write_to_path(str(paths["cert_only"]))
    cert.private_key_pem.write_to_path(str(paths["keyfile"]))
    ca.cert_pem.write_to_path(str(paths["ca_certs"]))
    return paths


def partner_env(setting: config.Setting) -> dict[str, str]:
    if setting.name == "keyfile":
        return {"FORKSERVER_CERTFILE": str(tls_files()["cert_only"])}
    if setting.name == "ca_certs":
        return {"FORKSERVER_CERTFILE": str(tls_files()["certfile"])}
    return {}


def as_toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, tuple):
        return json.dumps(list(value))
    return json.dumps(value)


def as_text(setting: config.Setting, value) -> str:
    """The string form for the environment and the command line."""
    if isinstance(setting.kind, config.Umask):
        return f"{value:03o}"
    if isinstance(value, bool):
        return "yes" if value else "off"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def as_argv(setting: config.Setting, flag: str, value) -> list[str]:
    if setting.positional:
        return [value]
    if isinstance(value, bool):
        return [flag if value else "--no-" + flag[2:]]
    if isinstance(setting.kind, config.CountList):
        return [flag, as_text(setting, value)]
    if isinstance(value, tuple):
        return [part for item in value for part in (flag, item)]
    return [flag, as_text(setting, value)]


@pytest.mark.parametrize("setting", config.SETTINGS, ids=lambda s: s.name)
def test_every_setting_round_trips_through_toml_env_and_cli(setting, tmp_path):
    value = sample(setting)
    (tmp_path / "file").mkdir()
    partner = partner_env(setting)
    from_file = load(tmp_path / "file", toml=f"{setting.name} = {as_toml(value)}\n", env=partner)
    from_env = load(tmp_path, env={**partner, setting.env: as_text(setting, value)})
    assert getattr(from_file, setting.name) == value
    assert getattr(from_env, setting.name) == value
    flags = [f for f in setting.flags if not isinstance(value, bool) or f.startswith("--")]
    for flag in flags or [None]:
        from_cli = load(tmp_path, argv=as_argv(setting, flag, value), env=partner)
        assert getattr(from_cli, setting.name) == value, flag
    # --print-config writes it back in a form the file loader accepts.
    (tmp_path / "printed.toml").write_text(config.to_toml(from_env), encoding="utf-8")
    again = load(tmp_path, argv=["-c", "printed.toml"], env=partner)
    assert getattr(again, setting.name) == value


# ------------------------------------------------------------------------- precedence


@pytest.mark.parametrize(
    "name, file_value, env_value, argv, expected",
    [
        ("workers", "3", "4", ["-w", "5"], (3, 4, 5)),
        ("keepalive", "1.5", "2", ["--keepalive", "0"], (1.5, 2.0, 0.0)),
        ("preload", "true", "0", ["--preload"], (True, False, True)),
        (
            "log_level", '"debug"', "WARNING", ["--log-level", "error"],
            ("debug", "warning", "error"),
        ),
        (
            "bind",
            '["[::1]:1", "unix:/tmp/a"]',
            "127.0.0.1:2,fd://3",
            ["-b", "localhost:4"],
            (("[::1]:1", "unix:/tmp/a"), ("127.0.0.1:2", "fd://3"), ("localhost:4",)),
        ),
        (
            "pidfile", '"/run/a.pid"', "/run/b.pid", ["-p", "/run/c.pid"],
            ("/run/a.pid", "/run/b.pid", "/run/c.pid"),
        ),
    ],
)
def test_precedence_default_file_env_cli(tmp_path, name, file_value, env_value, argv, expected):
    env_var = "FORKSERVER_" + name.upper()
    toml = f"{name} = {file_value}\n"
    default = next(s.default for s in config.SETTINGS if s.name == name)
    assert getattr(load(tmp_path, env={"WEB_CONCURRENCY": "9"}), name) == (
        9 if name == "workers" else default
    )
    assert getattr(load(tmp_path, toml=toml), name) == expected[0]
    assert getattr(load(tmp_path, env={env_var: env_value}), name) == expected[1]
    assert getattr(load(tmp_path, argv=argv, env={env_var: env_value}), name) == expected[2]
    assert getattr(load(tmp_path, argv=argv), name) == expected[2]  # file still present


def test_no_preload_flag_beats_env_and_file(tmp_path):
    settings = load(tmp_path, ["--no-preload"], {"FORKSERVER_PRELOAD": "on"}, "preload = true")
    assert settings.preload is False


def test_resolve_uses_the_given_environ_not_os_environ(tmp_path, monkeypatch):
    monkeypatch.setenv("FORKSERVER_BACKLOG", "9")
    monkeypatch.setenv("FORKSERVER_NOT_A_SETTING", "1")
    assert config.resolve({}, None, {}, str(tmp_path)).backlog == 2048


def test_resolve_again_sees_file_and_env_changes_but_keeps_cli(tmp_path):
    """What a HUP reload does: same CLI overrides and -c argument, fresh file and environment."""
    (tmp_path / "forkserver.toml").write_text("workers = 2\nbacklog = 10\n")
    namespace = config.parse_args(["--backlog", "99"])
    overrides = config.cli_overrides(namespace)
    first = config.resolve(overrides, namespace.config, {}, str(tmp_path))
    (tmp_path / "forkserver.toml").write_text("workers = 3\nbacklog = 11\n")
    env = {"FORKSERVER_KEEPALIVE": "1"}
    second = config.resolve(overrides, namespace.config, env, str(tmp_path))
    assert (first.workers, first.backlog, first.keepalive) == (2, 99, 5.0)
    assert (second.workers, second.backlog, second.keepalive) == (3, 99, 1.0)


def test_cli_overrides_holds_only_what_was_typed():
    namespace = config.parse_args(["-w", "3", "--no-preload", "-b", "a:1", "-b", "b:2", "my:app"])
    assert config.cli_overrides(namespace) == {
        "workers": 3,
        "preload": False,
        "bind": ("a:1", "b:2"),
        "app": "my:app",
    }
    assert config.cli_overrides(config.parse_args([])) == {}


# ------------------------------------------------------------------------ config files


def test_pyproject_tool_table_is_used(tmp_path):
    toml = '[project]\nname = "x"\n\n[tool.forkserver]\nworkers = 6\nbind = "unix:/tmp/s"\n'
    settings = load(tmp_path, toml=toml, name="pyproject.toml")
    assert settings.workers == 6
    assert settings.bind == ("unix:/tmp/s",)
    assert settings.config_file == str(tmp_path / "pyproject.toml")


def test_pyproject_without_tool_table_means_no_config_file(tmp_path):
    toml = '[project]\nname = "x"\n'
    settings = load(tmp_path, env={"WEB_CONCURRENCY": "2"}, toml=toml, name="pyproject.toml")
    assert settings.config_file is None
    assert settings.workers == 2


def test_forkserver_toml_wins_over_pyproject(tmp_path):
    (tmp_path / "pyproject.toml").write_text("[tool.forkserver]\nworkers = 6\n")
    settings = load(tmp_path, toml="workers = 4\n")
    assert settings.workers == 4
    assert settings.config_file == str(tmp_path / "forkserver.toml")


def test_explicit_config_is_relative_to_cwd_and_beats_discovery(tmp_path):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "prod.toml").write_text("workers = 5\n")
    settings = load(tmp_path, ["-c", "conf/prod.toml"], toml="workers = 4\n")
    assert settings.workers == 5
    assert settings.config_file == str(tmp_path / "conf" / "prod.toml")


def test_explicit_pyproject_reads_its_tool_table(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "pyproject.toml").write_text("[tool.forkserver]\nbacklog = 7\n")
    assert load(tmp_path, ["--config", "sub/pyproject.toml"]).backlog == 7


def test_missing_explicit_config_is_an_error_naming_it(tmp_path):
    message = error_of(tmp_path, ["-c", "nope.toml"])
    assert message == "cannot read config file nope.toml: No such file or directory"


def test_invalid_toml_names_the_file(tmp_path):
    message = error_of(tmp_path, toml="workers = = 3\n")
    assert message.startswith("forkserver.toml is not valid TOML: ")


def test_tool_forkserver_must_be_a_table(tmp_path):
    message = error_of(tmp_path, toml="[tool]\nforkserver = 3\n", name="pyproject.toml")
    assert "tool.forkserver must be a table" in message


# ------------------------------------------------------------------------------ errors


def test_unknown_file_key_names_the_key(tmp_path):
    message = error_of(tmp_path, toml="wokers = 3\n")
    assert message == "unknown setting 'wokers' in forkserver.toml (did you mean 'workers'?)"


def test_unknown_key_in_pyproject_names_the_table(tmp_path):
    message = error_of(tmp_path, toml="[tool.forkserver]\nzzz = 1\n", name="pyproject.toml")
    assert message == "unknown setting 'zzz' in pyproject.toml [tool.forkserver]"


def test_unknown_env_var_names_the_var(tmp_path):
    message = error_of(tmp_path, env={"FORKSERVER_WOKERS": "3"})
    assert message == (
        "unknown environment variable FORKSERVER_WOKERS (did you mean 'FORKSERVER_WORKERS'?)"
    )


def test_other_env_vars_are_ignored(tmp_path):
    settings = load(tmp_path, env={"WORKERS": "x", "FORKSERVERX": "1", "PATH": "/bin"})
    assert settings.backlog == 2048


@pytest.mark.parametrize(
    "argv, env, toml, message",
    [
        ([], {}, 'workers = "x"', 'workers = "x" in forkserver.toml: expected an integer'),
        (
            [], {"FORKSERVER_WORKERS": "x"}, None,
            'workers = "x" in environment variable FORKSERVER_WORKERS: expected an integer',
        ),
        (
            ["-w", "x"], {}, None,
            'workers = "x" on the command line (-w/--workers): expected an integer',
        ),
        ([], {}, "workers = 0", "workers = 0 in forkserver.toml: must be at least 1"),
        ([], {}, "workers = true", "workers = true in forkserver.toml: expected an integer"),
        ([], {}, "workers = 2.0", "workers = 2.0 in forkserver.toml: expected an integer"),
        ([], {}, "keepalive = -1", "keepalive = -1 in forkserver.toml: must not be negative"),
        (
            [], {}, "keepalive = nan",
            "keepalive = nan in forkserver.toml: expected a finite number of seconds",
        ),
        (
            ["--keepalive", "soon"], {}, None,
            'keepalive = "soon" on the command line (--keepalive): expected a number of seconds',
        ),
        (
            [], {"FORKSERVER_TIMEOUT": "inf"}, None,
            (
                'timeout = "inf" in environment variable FORKSERVER_TIMEOUT: '
                "expected a finite number of seconds"
            ),
        ),
        (
            ["--header-timeout", "0"], {}, None,
            'header_timeout = "0" on the command line (--header-timeout): must be greater than 0',
        ),
        ([], {}, 'preload = "true"', 'preload = "true" in forkserver.toml: expected true or false'),
        (
            [], {"FORKSERVER_PRELOAD": "maybe"}, None,
            (
                'preload = "maybe" in environment variable FORKSERVER_PRELOAD: '
                "expected one of 1/0, true/false, yes/no, on/off"
            ),
        ),
        (
            [], {}, 'log_level = "loud"',
            (
                'log_level = "loud" in forkserver.toml: '
                "expected one of debug, info, warning, error, critical"
            ),
        ),
        (
            [], {}, "bind = 80",
            "bind = 80 in forkserver.toml: expected a string or an array of strings",
        ),
        ([], {}, "bind = []", "bind = [] in forkserver.toml: must list at least one entry"),
        ([], {}, "chdir = 5", "chdir = 5 in forkserver.toml: expected a string"),
        (
            [], {}, 'proc_name = "a\\u0000b"',
            'proc_name = "a\\u0000b" in forkserver.toml: must not contain a NUL character',
        ),
        (
            [], {"FORKSERVER_BIND": " , "}, None,
            'bind = " , " in environment variable FORKSERVER_BIND: must list at least one entry',
        ),
    ],
)
def test_bad_values_name_the_setting_value_and_source(tmp_path, argv, env, toml, message):
    assert error_of(tmp_path, argv, env, toml) == message


def test_choice_is_case_insensitive(tmp_path):
    assert load(tmp_path, env={"FORKSERVER_LOG_LEVEL": "DEBUG"}).log_level == "debug"


def test_toml_integer_seconds_become_float(tmp_path):
    settings = load(tmp_path, toml="keepalive = 7\n")
    assert settings.keepalive == 7.0 and isinstance(settings.keepalive, float)


@pytest.mark.parametrize("text", ["1", "true", "YES", " on "])
def test_env_true_spellings(tmp_path, text):
    assert load(tmp_path, env={"FORKSERVER_PRELOAD": text}).preload is True


@pytest.mark.parametrize("text", ["0", "False", "no", "OFF"])
def test_env_false_spellings(tmp_path, text):
    assert load(tmp_path, ["--preload"], toml="preload = true").preload is True
    assert load(tmp_path, env={"FORKSERVER_PRELOAD": text}).preload is False


def test_usage_errors_are_config_errors():
    for argv in (["--bogus"], ["-w"], ["--check-config", "--print-config"], ["a:b", "c:d"],
                 ["--work", "3"]):
        with pytest.raises(config.ConfigError):
            config.parse_args(argv)


# -------------------------------------------------------------------------------- bind


@pytest.mark.parametrize(
    "spec",
    [
        "127.0.0.1:8000",
        "0.0.0.0:0",
        "localhost:65535",
        "example.com:443",
        "[::1]:8000",
        "[::]:80",
        "[fe80::1%eth0]:8000",
        "unix:/tmp/forkserver.sock",
        "unix:relative.sock",
        "fd://3",
    ],
)
def test_valid_binds(spec, tmp_path):
    assert load(tmp_path, ["-b", spec]).bind == (spec,)


@pytest.mark.parametrize(
    "spec, problem",
    [
        ("127.0.0.1", "expected HOST:PORT, [IPv6]:PORT, unix:/path or fd://N"),
        ("8000", "expected HOST:PORT"),
        (":8000", "expected HOST:PORT"),
        ("localhost:65536", "port '65536' is not a number from 0 to 65535"),
        ("localhost:http", "port 'http' is not a number"),
        ("localhost:-1", "port '-1' is not a number"),
        ("localhost:\uff18\uff10", "is not a number"),
        ("::1:8000", "an IPv6 address needs brackets"),
        ("[zz::1]:80", "[zz::1] is not an IPv6 address"),
        ("bad host:80", "'bad host' is not a host name or IPv4 address"),
        ("unix:", "unix: needs a socket path"),
        ("unix:/" + "a" * 120, "unix socket path is longer than 107 bytes"),
        ("fd://", "fd:// needs a file descriptor number"),
        ("fd://three", "fd:// needs a file descriptor number"),
    ],
)
def test_invalid_binds_are_config_errors(spec, problem, tmp_path):
    message = error_of(tmp_path, ["-b", "127.0.0.1:1", "-b", spec])
    assert message.startswith("bind = [")
    assert "on the command line (-b/--bind)" in message
    assert problem in message


def test_bind_listed_twice(tmp_path):
    message = error_of(tmp_path, toml='bind = ["a:1", "a:1"]')
    assert message == 'bind = ["a:1", "a:1"] in forkserver.toml: "a:1" is listed twice'


def test_bind_env_is_comma_separated(tmp_path):
    settings = load(tmp_path, env={"FORKSERVER_BIND": "127.0.0.1:1, [::1]:2 ,unix:/tmp/x"})
    assert settings.bind == ("127.0.0.1:1", "[::1]:2", "unix:/tmp/x")


# ------------------------------------------------------------------------------ workers


@pytest.fixture
def eight_cpus(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))


def cgroup(tmp_path: Path, files: dict[str, str], own: str = "/") -> dict[str, str]:
    root = tmp_path / "cgroup"
    root.mkdir()
    for relative, text in files.items():
        path = root / relative / "cpu.max"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (tmp_path / "self").write_text(f"0::{own}\n")
    return {"cgroup_root": str(root), "self_cgroup": str(tmp_path / "self")}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("max 100000\n", 8),
        ("200000 100000\n", 2),
        ("150000 100000\n", 2),  # a fractional quota rounds up
        ("50000 100000\n", 1),
        ("1600000 100000\n", 8),  # the affinity mask still caps
        ("garbage\n", 8),
        ("0 100000\n", 8),
    ],
)
def test_usable_cpus_honours_cgroup_cpu_max(tmp_path, eight_cpus, text, expected):
    assert config.usable_cpus(**cgroup(tmp_path, {"": text})) == expected


def test_usable_cpus_takes_the_tightest_limit_on_the_way_to_the_root(tmp_path, eight_cpus):
    paths = cgroup(
        tmp_path,
        {
            "": "max 100000",
            "system.slice": "100000 100000",
            "system.slice/app.service": "300000 100000",
        },
        own="/system.slice/app.service",
    )
    assert config.usable_cpus(**paths) == 1


def test_usable_cpus_without_cgroup_files(tmp_path, eight_cpus):
    missing = str(tmp_path / "missing")
    assert config.usable_cpus(cgroup_root=missing, self_cgroup=missing) == 8


def test_usable_cpus_follows_affinity(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    assert config.usable_cpus(**cgroup(tmp_path, {"": "max 100000"})) == 1


def test_default_workers_is_usable_cpus(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert load(tmp_path).workers == config.usable_cpus()


def test_web_concurrency_is_the_default_that_every_source_beats(tmp_path):
    env = {"WEB_CONCURRENCY": "7"}
    assert load(tmp_path, env=env).workers == 7
    assert load(tmp_path, env={**env, "FORKSERVER_WORKERS": "4"}).workers == 4
    assert load(tmp_path, ["-w", "5"], env=env).workers == 5
    assert load(tmp_path, env=env, toml="workers = 3").workers == 3


def test_bad_web_concurrency_names_it_unless_overridden(tmp_path):
    message = error_of(tmp_path, env={"WEB_CONCURRENCY": "lots"})
    assert message == (
        'workers = "lots" in environment variable WEB_CONCURRENCY: expected an integer'
    )
    assert load(tmp_path, ["-w", "2"], env={"WEB_CONCURRENCY": "lots"}).workers == 2


def test_importing_config_reads_no_environment():
    env = {**os.environ, "WEB_CONCURRENCY": "x", "FORKSERVER_WORKERS": "x", "FORKSERVER_BOGUS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", "import forkserver.config"],
        env=env, capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------ print-config, docs


def test_print_config_round_trips_tricky_values(tmp_path):
    argv = [
        "--proc-name", 'q"uote \\ back\tslash\n\x7f é ✓',
        "--chdir", "/srv/a b",
        "-b", "[::1]:9000", "-b", "unix:/tmp/s.sock",
        "--keepalive", "0.25",
        "--preload",
        "--limit-request-body", "0",
        "-w", "3",
        "pkg.mod:make_app(debug=True)",
    ]
    original = load(tmp_path, argv)
    (tmp_path / "printed.toml").write_text(config.to_toml(original), encoding="utf-8")
    again = load(tmp_path, ["-c", "printed.toml"])
    assert dataclasses.replace(again, config_file=None) == original
    assert again.config_file == str(tmp_path / "printed.toml")


@hsettings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")))
def test_any_text_survives_to_toml(text):
    settings = config.resolve({"proc_name": text}, None, {"WEB_CONCURRENCY": "1"}, "/nonexistent")
    assert tomllib.loads(config.to_toml(settings))["proc_name"] == text


def test_settings_doc_is_generated_from_the_table():
    committed = (ROOT / "docs" / "settings.md").read_text(encoding="utf-8")
    assert committed == config.settings_markdown(), (
        "docs/settings.md is stale: run `python -m forkserver.config > docs/settings.md`"
    )


def test_settings_doc_lists_every_setting_flag_and_env_var():
    doc = config.settings_markdown()
    for s in config.SETTINGS:
        assert f"| `{s.name}` |" in doc
        assert f"`{s.env}`" in doc
        for flag in s.flags:
            assert f"`{flag}" in doc
    assert "`--no-preload`" in doc


def test_help_mentions_every_flag_and_env_var():
    text = config.build_parser().format_help()
    for s in config.SETTINGS:
        assert s.env in text.replace("\n", " ").replace("  ", ""), s.name
        for flag in s.flags:
            assert flag in text


# ------------------------------------------------------------------- umask, hooks, reserved


@pytest.mark.parametrize(
    "argv, env, toml, expected",
    [
        ([], {}, None, None),
        ([], {}, "umask = 0o022", 0o022),
        ([], {}, 'umask = "027"', 0o027),
        ([], {"FORKSERVER_UMASK": "0o77"}, None, 0o077),
        ([], {"FORKSERVER_UMASK": ""}, "umask = 0o022", None),
        (["--umask", "0"], {}, None, 0),
    ],
)
def test_umask_forms(tmp_path, argv, env, toml, expected):
    assert load(tmp_path, argv, env, toml).umask == expected


@pytest.mark.parametrize("text", ["9", "0o1000", "rwx", "-1"])
def test_bad_umask(tmp_path, text):
    message = error_of(tmp_path, env={"FORKSERVER_UMASK": text})
    assert message.startswith(f'umask = "{text}" in environment variable FORKSERVER_UMASK: ')


def test_umask_is_printed_in_octal_and_left_out_when_unset(tmp_path):
    assert "umask = 0o022\n" in config.to_toml(load(tmp_path, ["--umask", "22"]))
    printed = config.to_toml(load(tmp_path))
    assert "umask" not in tomllib.loads(printed)
    assert "# umask is not set\n" in printed


def test_hooks_are_checked_for_form_only(tmp_path):
    assert load(tmp_path, ["--pre-fork", "no_such_module_at_all:hook"]).pre_fork == (
        "no_such_module_at_all:hook"
    )
    assert load(tmp_path).on_starting == ""
    message = error_of(tmp_path, toml='when_ready = "hooks.py"')
    assert message == 'when_ready = "hooks.py" in forkserver.toml: expected module:function'


def test_reserved_variables_are_not_unknown_settings(tmp_path):
    env = {name: "3,4" for name in config.RESERVED_ENV}
    assert load(tmp_path, env=env).backlog == 2048


def test_every_forkserver_variable_named_in_the_package_is_a_setting_or_reserved():
    """A new FORKSERVER_* hand-off variable must be reserved here, or a re-exec would fail."""
    import ast
    import re

    known = {s.env for s in config.SETTINGS} | config.RESERVED_ENV
    unknown = set()
    for path in (ROOT / "forkserver").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and re.fullmatch(r"FORKSERVER_[A-Z0-9_]+", node.value)
                and node.value not in known
            ):
                unknown.add(f"{path.name}: {node.value}")
    assert unknown == set()


# ------------------------------------------------------------ rules joining several settings


def test_reload_with_preload_is_refused_in_one_line(tmp_path):
    message = error_of(tmp_path, argv=["--reload", "--preload"])
    assert message.startswith("reload: cannot be combined with preload")


def test_bad_tls_settings_fail_in_one_line_naming_the_setting(tmp_path):
    missing = tmp_path / "nope.pem"
    assert error_of(tmp_path, argv=["--certfile", str(missing)]).startswith("certfile")
    # A key that does not belong to the certificate.
    other = tmp_path / "other-key.pem"
    import trustme

    trustme.CA().issue_cert("localhost").private_key_pem.write_to_path(str(other))
    message = error_of(tmp_path, argv=["--certfile", str(tls_files()["cert_only"]),
                                       "--keyfile", str(other)])
    assert message.startswith("keyfile"), message
    good = load(tmp_path, argv=["--certfile", str(tls_files()["certfile"]),
                                "--tls-min-version", "1.3"])
    assert good.tls_min_version == "1.3"


def test_tls_min_version_may_be_a_bare_toml_number(tmp_path):
    assert load(tmp_path, toml="tls_min_version = 1.3\n").tls_min_version == "1.3"
    assert "expected 1.2 or 1.3" in error_of(tmp_path, toml="tls_min_version = 1.1\n")


def test_refork_after_counts_must_increase(tmp_path):
    assert load(tmp_path, toml="refork_after = [50, 500]\n").refork_after == (50, 500)
    assert "must increase" in error_of(tmp_path, env={"FORKSERVER_REFORK_AFTER": "500,50"})


def test_threads_are_bounded_by_the_scoreboard_room(tmp_path):
    from forkserver import scoreboard

    assert load(tmp_path, argv=["--threads", str(scoreboard.THREADS_MAX)]).threads == 64
    message = error_of(tmp_path, argv=["--threads", str(scoreboard.THREADS_MAX + 1)])
    assert message.endswith("must be at most 64"), message
