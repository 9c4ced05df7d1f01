"""/proc and ss readings of the benchmark's processes. Starting processes that die with the
benchmark, loopback ports and gunicorn's workers come from tests/support/processes.py, which the
tests and make e2e use too; the benchmark's modules import them from here."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.processes import children, free_port, popen  # noqa: E402,F401


def rss_mb(pid: int) -> float | None:
    """Resident set size of `pid` in MB (VmRSS), None once it has gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def thread_count(pid: int) -> int | None:
    """Threads of `pid`."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def connections_per_process(port: int) -> dict[int, int] | None:
    """Established TCP connections to local `port`, counted by the pid holding them (`ss -tnp`)."""
    try:
        out = subprocess.run(["ss", "-tnpH", "state", "established", f"( sport = :{port} )"],
                             capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    counts: dict[int, int] = {}
    for pid in re.findall(r"pid=(\d+)", out):
        counts[int(pid)] = counts.get(int(pid), 0) + 1
    return counts
