"""load/bench_all.py: every benchmark runs in turn, and only real runs reach docs/benchmark/."""

from __future__ import annotations

from load import bench_all


def _fake_runs(monkeypatch, tmp_path, statuses: dict[str, int]) -> list[list[str]]:
    results, docs = tmp_path / "results", tmp_path / "docs"
    results.mkdir()
    docs.mkdir()
    monkeypatch.setattr(bench_all, "RESULTS", results)
    monkeypatch.setattr(bench_all, "DOCS", docs)
    calls: list[list[str]] = []

    def run_step(step, extra):
        calls.append([step.script, *extra])
        for name in step.outputs:
            (results / name).write_text(f"written by {step.script}")
        return statuses.get(step.script, 0), 1.0

    monkeypatch.setattr(bench_all, "run_step", run_step)
    return calls


def test_a_real_run_copies_every_table_and_picture_to_docs(monkeypatch, tmp_path):
    calls = _fake_runs(monkeypatch, tmp_path, {"bench_mixed.py": 1})
    assert bench_all.main(["--full"]) == 1  # the worst status of the three
    # All three ran although the second failed; --full went to bench.py only.
    assert calls == [["bench.py", "--full"], ["bench_mixed.py"], ["bench_memory.py"]]
    copied = sorted(p.name for p in (tmp_path / "docs").iterdir())
    assert copied == ["bench-memory.md", "bench-memory.png", "bench-mixed.md", "bench.md",
                      "bench.png"]
    assert (tmp_path / "docs" / "bench.md").read_text() == "written by bench.py"


def test_a_quick_run_leaves_docs_alone(monkeypatch, tmp_path):
    calls = _fake_runs(monkeypatch, tmp_path, {})
    assert bench_all.main(["--quick", "--no-install"]) == 0
    assert all(call[1:] == ["--quick", "--no-install"] for call in calls) and len(calls) == 3
    assert list((tmp_path / "docs").iterdir()) == []
