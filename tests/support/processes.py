"""Processes and ports of the tests, make e2e and make bench: children that die with their parent,
free loopback ports, a process's children (gunicorn's workers), stopping a process."""
import ctypes
import signal
import socket
import subprocess
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when its parent dies, even by SIGKILL (Linux only)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def popen(args, **kwargs) -> subprocess.Popen:
    """subprocess.Popen, tied to this process's life."""
    return subprocess.Popen(args, preexec_fn=_die_with_parent, **kwargs)


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def children(pid: int) -> list[int]:
    """The direct children of `pid` (gunicorn's workers, for its master)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    if found:
        return sorted(set(found))
    # Kernels without /proc/<pid>/task/<tid>/children: scan every process's parent.
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return sorted(found)


def stop(process: subprocess.Popen, timeout: float = 30, sig: int = signal.SIGTERM) -> int:
    """Ask `process` to stop (SIGTERM: gracefully), kill it after `timeout` seconds; its status."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode
