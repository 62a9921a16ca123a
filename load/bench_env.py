"""What the benchmarks need around them: wrk, the bench venv, matplotlib, the machine's name.

Shared by load/bench.py, load/bench_mixed.py and load/bench_memory.py. The competitors live in
their own virtualenv ``load/.bench-venv`` (never in the project's dependencies), next to an
editable install of this checkout of forkserver, so a benchmark always measures the working
tree. A stamp records what was installed for which pyproject.toml, so later runs skip pip.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from load.servers import ROOT


def judged(value: float, limit: float, higher: bool = True) -> tuple[str, str]:
    """A ratio against its target: (the ratio as shown, "met" or "NOT met"). Two decimals, or
    three where two would round onto the limit: 0.749x is shown so, not as a 0.75x that
    failed."""
    met = value >= limit if higher else value <= limit
    shown = f"{value:.2f}"
    if float(shown) == limit and value != limit:
        shown = f"{value:.3f}"
    return f"{shown}x", "met" if met else "NOT met"


BENCH_VENV = ROOT / "load" / ".bench-venv"
RESULTS = ROOT / "load" / "results"
# Bump when the package list changes, so existing bench venvs are completed on the next run.
PACKAGE_SET = 4
# Always needed (pure Python wheels); a failure to install them is a setup error.
REQUIRED = ("gunicorn", "django", "flask")


class SetupError(Exception):
    """A tool or package the benchmark needs cannot be installed here."""


def pip_install(python: Path | str, *args: str, timeout: float = 900) -> bool:
    result = subprocess.run([str(python), "-m", "pip", "install", "--quiet",
                             "--disable-pip-version-check", *args],
                            cwd=ROOT, check=False, timeout=timeout)
    return result.returncode == 0


def _apt_install(package: str) -> bool:
    """``apt-get install`` as root; False when not root, no apt-get, or the install fails."""
    if not shutil.which("apt-get") or os.geteuid() != 0:
        return False
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print(f"apt-get install -y {package}", flush=True)
    argv = ["apt-get", "install", "-y", "-q", package]
    if subprocess.run(argv, env=env, check=False, timeout=600).returncode == 0:
        return True
    # A fresh machine may not have read the package lists yet.
    subprocess.run(["apt-get", "update", "-q"], env=env, check=False, timeout=600)
    return subprocess.run(argv, env=env, check=False, timeout=600).returncode == 0


def ensure_wrk(install: bool) -> str:
    """wrk's path; installs Debian's package when missing and allowed (as root)."""
    found = shutil.which("wrk")
    if not found and install:
        _apt_install("wrk")
        found = shutil.which("wrk")
    if not found:
        raise SetupError("wrk is not installed; install it with `apt-get install -y wrk` "
                         "(needs root) and run the benchmark again")
    return found


def _importable(python: Path, module: str) -> bool:
    return subprocess.run([str(python), "-c", f"import {module}"], capture_output=True,
                          check=False, timeout=60).returncode == 0


def _install_meinheld(python: Path) -> str:
    # meinheld's last release pins a greenlet that does not build on Python 3.11; it works
    # with a current one, hence --no-deps. A C build may fail: then it is left out.
    if pip_install(python, "--no-deps", "meinheld", "greenlet", timeout=600) \
            and _importable(python, "meinheld.gmeinheld"):
        return ""
    return "meinheld did not build here"


def _install_bjoern(python: Path) -> str:
    # bjoern compiles against libev; Debian ships its headers in libev-dev.
    if not Path("/usr/include/ev.h").exists() and not _apt_install("libev-dev"):
        return ("bjoern needs libev's headers (`apt-get install libev-dev`, as root) and "
                "they are missing")
    if pip_install(python, "bjoern", timeout=600) and _importable(python, "bjoern"):
        return ""
    return "bjoern did not build here"


def _install_granian(python: Path) -> str:
    # A Rust extension: platforms without a wheel would need a Rust toolchain to build it.
    if pip_install(python, "granian", timeout=600) and _importable(python, "granian"):
        return ""
    return "granian did not install here"


OPTIONAL = {"granian": _install_granian, "meinheld": _install_meinheld,
            "bjoern": _install_bjoern}


def ensure_bench_venv(install: bool, reinstall: bool) -> tuple[Path, dict[str, str]]:
    """The bench venv's python and, for each optional server, why it is missing ("" if not)."""
    python = BENCH_VENV / "bin" / "python"
    stamp = BENCH_VENV / ".installed.json"
    want = {"pyproject": hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest(),
            "python": platform.python_version(), "packages": PACKAGE_SET}
    if not reinstall and stamp.exists() and python.exists():
        have = json.loads(stamp.read_text())
        if all(have.get(key) == value for key, value in want.items()):
            return python, have.get("missing", {})
    if not install:
        raise SetupError(f"{BENCH_VENV} is missing or stale and --no-install was given")
    if not python.exists():
        print(f"creating {BENCH_VENV}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True, timeout=300)
        # Keeps git from listing the venv whatever the repository's .gitignore says.
        (BENCH_VENV / ".gitignore").write_text("*\n")
    print(f"installing {', '.join(REQUIRED)} and forkserver into the bench venv", flush=True)
    if not pip_install(python, *REQUIRED) or not pip_install(python, "-e", str(ROOT)):
        raise SetupError(f"pip could not install {', '.join(REQUIRED)} and forkserver into "
                         "the bench venv")
    missing = {name: installer(python) for name, installer in OPTIONAL.items()}
    for name, why in missing.items():
        if why:
            print(f"{why}: {name} is left out of the comparison", flush=True)
    stamp.write_text(json.dumps({**want, "missing": missing}))
    return python, missing


def ensure_matplotlib(install: bool) -> bool:
    """matplotlib for the pictures, from the project's ``load`` extra (in this interpreter)."""
    if importlib.util.find_spec("matplotlib") is not None:
        return True
    if not install or sys.prefix == sys.base_prefix:
        return False
    print("matplotlib missing: installing the 'load' extra", flush=True)
    pip_install(sys.executable, "-e", f"{ROOT}[load]")
    importlib.invalidate_caches()
    return importlib.util.find_spec("matplotlib") is not None


def help_text(python: Path, module: str) -> str:
    """``python -m module --help``: which flags the build under test has."""
    result = subprocess.run([str(python), "-m", module, "--help"], capture_output=True,
                            text=True, check=False, timeout=60, cwd=ROOT)
    return result.stdout


def supports(help_output: str, *flags: str) -> bool:
    """Whether every flag appears, as a whole word, in a ``--help`` output."""
    words = set(help_output.replace(",", " ").replace("[", " ").replace("]", " ")
                .replace("|", " ").split())
    return all(flag in words for flag in flags)


# Run by the bench venv's python: the versions that were actually measured.
_VERSIONS_SCRIPT = """
import importlib.metadata as m, json, platform
out = {"python": platform.python_version()}
for name in ("forkserver", "gunicorn", "granian", "bjoern", "meinheld", "greenlet", "django",
             "flask"):
    try:
        out[name] = m.version(name)
    except m.PackageNotFoundError:
        pass
print(json.dumps(out))
"""


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(python: Path, wrk: str | None) -> dict[str, str]:
    """Date, machine, versions and commit: what every table must state."""
    now = dt.datetime.now(dt.UTC)
    info = {"date": now.strftime("%Y-%m-%d %H:%M UTC"), "day": now.strftime("%Y-%m-%d"),
            "cpu": cpu_model(), "cores": str(len(os.sched_getaffinity(0))),
            "machine": f"{platform.node()}: {cpu_model()}, {os.cpu_count()} CPUs "
                       f"({len(os.sched_getaffinity(0))} usable), {platform.platform()}"}
    versions = subprocess.run([str(python), "-c", _VERSIONS_SCRIPT], check=False,
                              capture_output=True, text=True, timeout=60)
    try:
        info.update(json.loads(versions.stdout))
    except ValueError:
        info["python"] = platform.python_version()
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=False, timeout=30)
    if head.returncode == 0:
        # --no-optional-locks: a status must not rewrite the index of a tree others work in.
        dirty = subprocess.run(["git", "--no-optional-locks", "-C", str(ROOT), "status",
                                "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=False, timeout=30).stdout.strip()
        info["commit"] = head.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    if wrk:
        out = subprocess.run([wrk, "--version"], capture_output=True, text=True, check=False,
                             timeout=30)
        # "wrk debian/4.1.0-3+b2 [epoll] Copyright ..." -> "debian/4.1.0-3+b2"
        words = (out.stdout or out.stderr).split()
        info["wrk"] = words[1] if len(words) > 1 else "unknown"
    return info


def caption(info: dict[str, str]) -> str:
    """The one line above every table: CPU model, cores, Python, date."""
    return (f"*{info['cpu']}, {info['cores']} cores, Python {info.get('python', '?')}, "
            f"{info['date']}.*")


def versions_line(info: dict[str, str]) -> str:
    names = ("python", "forkserver", "gunicorn", "granian", "bjoern", "meinheld", "greenlet",
             "django", "flask", "wrk")
    line = "Versions: " + ", ".join(f"{k} {info[k]}" for k in names if k in info)
    return line + (f"; forkserver commit {info['commit']}" if "commit" in info else "") + "."
