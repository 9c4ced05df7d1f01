"""The benchmark harness still starts: bench/run.py --quick, one scenario for 2 s, on SQLite, and
bench/turn_cost.py for a few turns.

Not a measurement: it asserts only that requests went through. It needs wrk, nginx and nginx's echo
module (`make bench-deps`); without them it is skipped (so that `make test` passes on a machine with
only Python and make), or fails under --require-services, as in CI. BENCH_SMOKE=skip skips it."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import skip_or_fail

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 60
MISSING_TOOLS_EXIT = 3  # bench/run.py's exit code when wrk, nginx or the echo module is missing


def run_quick_bench(tmp_path: Path, *args: str) -> tuple[int, str, dict | None]:
    """bench/run.py --quick with `args`: its exit code, its output, its JSON results."""
    results = tmp_path / "bench.json"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--json", str(results), *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)  # the harness stops gunicorn and nginx on its way out
        output, _ = process.communicate(timeout=60)
        pytest.fail(f"bench/run.py --quick took more than {TIMEOUT_S} s:\n{output}")
    return process.returncode, output, json.loads(results.read_text()) if results.exists() else None


def test_bench_quick_run_serves_turns(request, tmp_path):
    if os.environ.get("BENCH_SMOKE") == "skip":
        pytest.skip("BENCH_SMOKE=skip")

    code, output, results = run_quick_bench(tmp_path, "--sqlite", "--scenarios", "S1")

    if code == MISSING_TOOLS_EXIT:
        skip_or_fail(request, f"bench smoke skipped: {output.strip()}")
    assert code == 0, output
    (run,) = results["scenarios"]["S1"]["runs"]
    assert run["ok"] > 0, output
    assert run["non2xx"] == 0, run["statuses"]
    assert run["statuses"].keys() == {"200"}


def test_turn_cost_measures_both_kinds_of_turn(request, tmp_path):
    if os.environ.get("BENCH_SMOKE") == "skip":
        pytest.skip("BENCH_SMOKE=skip")
    profile = tmp_path / "turn.prof"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "turn_cost.py"), "--sqlite", "--turns", "20", "--runs", "1",
         "--profile", str(profile)],
        cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S,
    )
    if done.returncode == MISSING_TOOLS_EXIT:
        skip_or_fail(request, f"turn_cost smoke skipped: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines[:2]] == ["new", "continue"], done.stdout
    for line in lines[:2]:
        cpu_us = float(line.split("CPU")[1].split("us")[0])
        assert cpu_us > 0, line
    assert profile.stat().st_size > 0
