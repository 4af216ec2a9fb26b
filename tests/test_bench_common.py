"""benchmarks/_common.py: the lock, one process per configuration, stamped atomic writes."""

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import make_readme  # noqa: E402

import _common  # noqa: E402


def _python(code: str, lock: Path) -> list[str]:
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(BENCH)!r}); from pathlib import Path\n"
            + textwrap.dedent(code).replace("LOCKPATH", f"Path({str(lock)!r})")]


def test_lock_held_by_an_ancestor_does_not_wait_but_another_holder_does(tmp_path):
    lock = tmp_path / ".train.lock"
    take = """
        import time, _common
        with _common.bench_lock(LOCKPATH):
            print(time.time(), flush=True)
    """
    # under `flock`-like holding by the parent: the child must not wait for itself
    nested = _python("""
        import subprocess, sys, _common
        with _common.bench_lock(LOCKPATH):
            sys.exit(subprocess.run([sys.executable, "-c", sys.argv[1]]).returncode)
    """, lock) + [_python(take, lock)[2]]
    assert subprocess.run(nested, timeout=60).returncode == 0
    # a sibling holds it for 2 s: we wait for it
    holder = subprocess.Popen(_python("""
        import fcntl, time
        f = open(LOCKPATH, "a"); fcntl.flock(f, fcntl.LOCK_EX); print("held", flush=True); time.sleep(2)
    """, lock), stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    start = time.time()
    got = float(subprocess.run(_python(take, lock), capture_output=True, text=True, timeout=60).stdout)
    holder.wait(timeout=60)
    assert got - start > 1.0


def test_run_config_returns_the_child_result_or_says_why_not(tmp_path):
    child = tmp_path / "child.py"
    child.write_text(f"import sys; sys.path.insert(0, {str(BENCH)!r}); import _common, os\n"
                     "if sys.argv[1] == 'ok':\n"
                     "    print('noise'); _common.emit_result({'x': int(sys.argv[2]), 'env': os.environ['FOO']})\n"
                     "else:\n"
                     "    sys.exit('broken ' + sys.argv[2])\n")
    assert _common.run_config(child, ["ok", "3"], env={"FOO": "bar"}) == {"x": 3, "env": "bar"}
    with pytest.raises(_common.ChildFailed, match="broken 7"):
        _common.run_config(child, ["fail", "7"])


def test_run_grid_skips_held_rows_unless_named_and_writes_after_each(tmp_path, capsys):
    child = tmp_path / "grid_child.py"
    child.write_text(f"import sys, json; sys.path.insert(0, {str(BENCH)!r}); import _common\n"
                     "spec = json.loads(sys.argv[2])\n"
                     "if spec['x'] < 0: sys.exit('negative')\n"
                     "_common.emit_result({'y': spec['x'] * int(sys.argv[3])})\n")
    grid = {"a": {"x": 1}, "b": {"x": 2}, "bad": {"x": -1}}
    out = tmp_path / "r.json"
    results = {"runs": {"a": {"y": 99}}}
    _common.run_grid(child, grid, None, results, out, ["10"])
    assert results["runs"]["a"] == {"y": 99} and results["runs"]["b"]["y"] == 20 and "bad" not in results["runs"]
    assert json.loads(out.read_text())["runs"]["b"]["y"] == 20
    assert "bad failed" in capsys.readouterr().err
    _common.run_grid(child, grid, ["a"], results, out, ["10"])  # a named row runs again
    assert results["runs"]["a"]["y"] == 10


def test_json_results_are_stamped_and_written_whole(tmp_path):
    out = tmp_path / "sub" / "r.json"
    _common.write_json(out, {"a": 1})
    assert json.loads(out.read_text()) == {"a": 1, "git_commit": _common.git_commit()}
    assert _common.git_commit() != ""
    merged = _common.merge_json(out, {"b": 2})
    assert merged["a"] == 1 and merged["b"] == 2 and json.loads(out.read_text()) == merged
    assert sorted(p.name for p in out.parent.iterdir()) == [".r.json.lock", "r.json"]  # no temporary left


def test_make_readme_keeps_the_markers_make_report_writes_between(tmp_path, monkeypatch):
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    (tmp_path / "README.md").write_text("# project\n")
    (results / "recovery.md").write_text("# Sparse recovery\n\nTable.\n")
    monkeypatch.setattr(make_readme, "RESULTS", results)
    monkeypatch.setattr(sys, "argv", ["make_readme.py"])
    make_readme.main()
    text = (results / "README.md").read_text()
    begin, end = make_readme.RECOVERY_BEGIN, make_readme.RECOVERY_END
    assert begin in text and end in text and text.index(begin) < text.index("Table.") < text.index(end)


def test_bench_runtime_cold_copies_and_paired_ratios():
    """Cold timing cycles through distinct copies; speed-ups are medians of same-round ratios."""
    import torch

    import bench_runtime

    seen = []
    call = bench_runtime._rotating(lambda p: (lambda: seen.append(p["w"].data_ptr())), {"w": torch.ones(4)}, "cold")
    for _ in range(call.copies + 1):
        call()
    assert call.copies >= 2 and len(set(seen)) == call.copies and seen[0] == seen[call.copies]
    assert bench_runtime._rotating(lambda p: (lambda: None), {"w": torch.ones(4)}, "warm").copies == 1
    assert bench_runtime._paired({"dense": [2.0, 4.0, 6.0], "k": [1.0, 1.0, 2.0]})["k"][0] == 3.0
