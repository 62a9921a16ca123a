"""load/run.py's argument parsing and gate logic, in-process: no server, no locust, no pip.

The locust run itself is exercised by ``make load`` (load/test_locust_smoke.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from load import run as driver


@pytest.mark.parametrize("text, seconds", [("30", 30.0), ("30s", 30.0), ("2m", 120.0),
                                           ("1m30s", 90.0), ("1h", 3600.0), ("1.5", 1.5)])
def test_parse_duration(text, seconds):
    assert driver.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "s", "10x", "1s1m", "-5"])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError):
        driver.parse_duration(text)


@pytest.mark.parametrize("text", ["0", "0s", "abc"])
def test_the_parser_rejects_a_run_time_that_is_not_a_positive_duration(text, capsys):
    with pytest.raises(SystemExit) as exited:
        driver.build_parser().parse_args(["--run-time", text])
    assert exited.value.code == 2
    assert "--run-time" in capsys.readouterr().err


def test_the_parser_rejects_an_unknown_scenario(capsys):
    with pytest.raises(SystemExit):
        driver.build_parser().parse_args(["--scenario", "NoSuchUser"])
    assert "NoSuchUser" in capsys.readouterr().err


def test_defaults_and_the_locust_command_line(tmp_path):
    args = driver.build_parser().parse_args([])
    assert (args.run_time, args.users, args.spawn_rate, args.workers) == ("30s", 24, 12.0, 2)
    assert args.max_p95_ms is None and args.scenarios is None and args.tags is None

    argv = driver.locust_command(args, "http://127.0.0.1:9", tmp_path / "p", tmp_path / "r.html")
    assert argv[:3] == [sys.executable, "-m", "locust"]
    assert argv[argv.index("--host") + 1] == "http://127.0.0.1:9"
    assert argv[argv.index("--run-time") + 1] == "30s"
    assert "--headless" in argv and "--max-p95-ms" not in argv and "--tags" not in argv
    assert not set(driver.SCENARIOS) & set(argv)  # no class named: locust runs them all


def test_selection_and_gate_options_reach_locust(tmp_path):
    args = driver.build_parser().parse_args(
        ["-t", "1m30s", "-u", "6", "--max-p95-ms", "250", "--tags", "hello", "json",
         "--scenario", "HelloUser", "--scenario", "SlowMixUser", "--processes", "2"])
    argv = driver.locust_command(args, "http://127.0.0.1:9", tmp_path / "p", tmp_path / "r.html")
    assert argv[argv.index("--max-p95-ms") + 1] == "250.0"
    assert argv[argv.index("--users") + 1] == "6"
    assert argv[argv.index("--processes") + 1] == "2"
    tags = argv.index("--tags")
    assert argv[tags + 1:tags + 3] == ["hello", "json"]
    assert argv[-2:] == ["HelloUser", "SlowMixUser"]


@pytest.mark.parametrize("bad", [["--users", "0"], ["--spawn-rate", "0"], ["--workers", "0"]])
def test_main_refuses_non_positive_counts_before_installing_or_starting_anything(bad, capsys):
    # The check comes before ensure_locust and before the server: nothing is installed or run.
    assert driver.main([*bad, "--no-install"]) == driver.EXIT_GATE
    assert "must be positive" in capsys.readouterr().err


CSV_HEAD = ("Type,Name,Request Count,Failure Count,Median Response Time,"
            "Average Response Time,Min Response Time,Max Response Time,Average Content Size,"
            "Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,99.99%,100%\n")


def _stats(tmp_path: Path, *lines: str) -> list[driver.StatsRow]:
    path = tmp_path / "stats.csv"
    path.write_text(CSV_HEAD + "".join(line + "\n" for line in lines))
    return driver.read_stats(path)


def test_gate_passes_a_clean_run(tmp_path):
    rows = _stats(tmp_path,
                  "GET,/hello,100,0,2,2.5,1,9,13,50.0,0.0,2,3,3,4,5,6,8,9,9,9,9",
                  ",Aggregated,100,0,2,2.5,1,9,13,50.0,0.0,2,3,3,4,5,6,8,9,9,9,9")
    assert rows[-1].p95_ms == 6.0 and rows[0].requests == 100
    assert driver.gate(rows, None) == []
    assert driver.gate(rows, 6.0) == []  # at the limit is within it


def test_gate_fails_on_failures_latency_and_empty_runs(tmp_path):
    failed = _stats(tmp_path, ",Aggregated,100,1,2,2.5,1,9,13,50.0,0.5,2,3,3,4,5,6,8,9,9,9,9")
    assert driver.gate(failed, None) == ["1 of 100 requests failed"]
    slow = _stats(tmp_path, ",Aggregated,100,0,2,2.5,1,9,13,50.0,0.0,2,3,3,4,5,60,8,9,9,9,9")
    assert driver.gate(slow, None) == []
    assert driver.gate(slow, 50.0) == ["p95 60 ms exceeds --max-p95-ms 50"]
    both = _stats(tmp_path, ",Aggregated,10,2,2,2.5,1,9,13,50.0,0.0,2,3,3,4,5,60,8,9,9,9,9")
    assert len(driver.gate(both, 50.0)) == 2
    empty = _stats(tmp_path, ",Aggregated,0,0,0,0,0,0,0,0.0,0.0,"
                             "N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A")
    assert empty[0].p95_ms is None
    assert driver.gate(empty, 50.0) == ["no request was made"]
    assert driver.gate([], None) == ["the stats CSV has no Aggregated row"]


def test_format_stats_shows_missing_percentiles_as_a_dash(tmp_path):
    rows = _stats(tmp_path, ",Aggregated,0,0,0,0,0,0,0,0.0,0.0,"
                            "N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A")
    table = driver.format_stats(rows).splitlines()
    assert table[0].startswith("request") and "Aggregated" in table[1]
    assert table[1].split()[-3:] == ["-", "-", "-"]
