"""The results as Markdown: the table of medians, the ratios against the targets, memory, settings."""
import statistics
from datetime import datetime
from pathlib import Path

import outage

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Targets of the benchmark issue (not of the tests).
SLOW_AGENT_SECONDS = 0.2
S3_CONNECTIONS = 128
S3_MIN_FRACTION = 0.8
S4_MAX_RATIO = 1.10
S4_SHORT_P50_MAX_MS = 5.0
RSS_MAX_MB = 100.0

ROWS = [
    # key, scenario, what
    ("STUB-instant", "stub", "agent stub alone, instant: POST /v1/chat/completions straight to nginx"),
    ("STUB-slow", "stub", "agent stub alone, 200 ms: POST /v1/chat/completions straight to nginx"),
    ("S0", "S0", "ceiling: GET /healthz"),
    ("S1", "S1", "new-conversation turns, instant agent"),
    ("S2", "S2", "turns continuing 256 existing conversations, instant agent"),
    ("S3", "S3", "new-conversation turns, 200 ms agent"),
    ("S4-short", "S4", "sequential turns, conversations of 10 messages"),
    ("S4-long", "S4", "sequential turns, a conversation of 2,000 messages"),
]


def write_results(text: str, output: Path | None, started: datetime, commit: str, suffix: str = "") -> Path:
    """Write a report to `output` (--output), or to results/<date>-<commit><suffix>.md; its path."""
    path = output or RESULTS_DIR / f"{started:%Y-%m-%d}-{commit}{suffix}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def summarize(runs: list[dict]) -> dict:
    """Medians of rate and latency over the runs; errors summed over all of them."""
    return {
        "runs": len(runs),
        "rps": statistics.median(run["rps"] for run in runs),
        "p50_ms": statistics.median(run["p50_ms"] for run in runs),
        "p99_ms": statistics.median(run["p99_ms"] for run in runs),
        "requests": sum(run["requests"] for run in runs),
        "ok": sum(run["ok"] for run in runs),
        "non2xx": sum(run["non2xx"] for run in runs),
        "socket_errors": sum(run["socket_errors"] for run in runs),
    }


def non2xx_text(run: dict) -> str:
    """A run's non-2xx count, with the statuses behind it: "2 (409: 1, 503: 1)"."""
    failed = {status: count for status, count in run.get("statuses", {}).items() if not 200 <= int(status) <= 299}
    detail = ", ".join(f"{status}: {count}" for status, count in sorted(failed.items()))
    return f"{run['non2xx']} ({detail})" if detail else str(run["non2xx"])


def _num(value, digits=1):
    return "-" if value is None else f"{value:,.{digits}f}"


def ratios(results: dict) -> list[dict]:
    """The issue's ratios, each with its target and whether it is met (None: not measured)."""
    summary = {key: summarize(entry["runs"]) for key, entry in results["scenarios"].items() if entry["runs"]}
    out = []

    def add(name, value, target, met, note=""):
        out.append({"name": name, "value": value, "target": target, "met": met, "note": note})

    if "S0" in summary and "S1" in summary:
        value = summary["S1"]["rps"] / summary["S0"]["rps"]
        add("S1 / S0 (req/s)", value, "informative: the share of the stack's ceiling a turn keeps", None)
    if "S3" in summary and "S1" in summary:
        bound = min(S3_CONNECTIONS / SLOW_AGENT_SECONDS, summary["S1"]["rps"])
        value = summary["S3"]["rps"] / bound
        add("S3 / min(640, S1) (req/s)", value, f">= {S3_MIN_FRACTION}", value >= S3_MIN_FRACTION,
            f"min(640, S1) = {bound:,.1f} req/s")
    if "S4-short" in summary and "S4-long" in summary:
        short, long = summary["S4-short"], summary["S4-long"]
        value = long["p50_ms"] / short["p50_ms"]
        add("S4(2000) / S4(10), p50", value, f"<= {S4_MAX_RATIO}", value <= S4_MAX_RATIO)
        add("S4(2000) / S4(10), p99", long["p99_ms"] / short["p99_ms"], "informative", None)
        add("S4(10) p50 (ms)", short["p50_ms"], f"<= {S4_SHORT_P50_MAX_MS}", short["p50_ms"] <= S4_SHORT_P50_MAX_MS)
    memory = results.get("memory")
    if memory and memory.get("workers"):
        peak = max(max(filter(None, (worker.get(k) for k in ("start", "rest", "in_flight"))), default=0)
                   for worker in memory["workers"])
        add("RSS per worker, max (MB)", peak, f"<= {RSS_MAX_MB:.0f}", peak <= RSS_MAX_MB)
    failing = [key for key, entry in summary.items() if entry["non2xx"] or entry["socket_errors"]]
    if summary:
        add("non-2xx and socket errors", sum(entry["non2xx"] + entry["socket_errors"] for entry in summary.values()),
            "0 in every scenario", not failing, ("in " + ", ".join(failing)) if failing else "")
    return out


def outage_section(result: dict) -> list[str]:
    """The OUTAGE scenario's figures (bench/outage.py)."""
    return ["", "## OUTAGE: the agent hangs for 15 s under S3's load (bench/outage.py)", "",
            f"AGENT_TIMEOUT and AGENT_BREAKER_SECONDS 5 s, {outage.CLIENTS} clients.", "",
            outage.table({"value": result})]


def markdown(results: dict) -> str:
    """The whole report."""
    meta = results["meta"]
    lines = [f"# chatapp benchmark, {meta['date']}, commit {meta['commit']}", ""]
    lines += [
        f"Database: {meta['database']}. Agent stub: nginx {meta['nginx']} with the echo module, instant or "
        f"{SLOW_AGENT_SECONDS * 1000:.0f} ms. Load: {meta['wrk']}. "
        f"Each scenario: {meta['runs']} run(s) of {meta['duration']} s (S4: {meta['s4_turns']} turns a run), "
        "medians of req/s and latency; non-2xx and socket errors are totals over the runs.",
        "",
        "| scenario | what | conns | req/s | p50 ms | p99 ms | non-2xx | socket errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    scenarios = results["scenarios"]
    for key, label, what in ROWS:
        entry = scenarios.get(key)
        if not entry or not entry["runs"]:
            continue
        s = summarize(entry["runs"])
        name = key if label != "stub" else key.lower()
        lines.append(
            f"| {name} | {what} | {entry['connections']} | {_num(s['rps'])} | {_num(s['p50_ms'], 2)} | "
            f"{_num(s['p99_ms'], 2)} | {s['non2xx']} | {s['socket_errors']} |"
        )
    table_ratios = ratios(results)
    if table_ratios:
        lines += ["", "## Ratios and targets", "", "| measure | value | target | met |", "|---|---:|---|---|"]
        for ratio in table_ratios:
            met = {True: "yes", False: "**no**", None: "-"}[ratio["met"]]
            note = f" ({ratio['note']})" if ratio["note"] else ""
            lines.append(f"| {ratio['name']} | {_num(ratio['value'], 2)} | {ratio['target']}{note} | {met} |")

    memory = results.get("memory")
    if memory and memory.get("workers"):
        lines += [
            "", "## S5: memory of each gunicorn worker (VmRSS, MB)", "",
            "| worker pid | after start | at rest, after load | 128 turns in flight (max) | threads (max) |",
            "|---:|---:|---:|---:|---:|",
        ]
        for worker in memory["workers"]:
            lines.append(f"| {worker['pid']} | {_num(worker.get('start'))} | {_num(worker.get('rest'))} | "
                         f"{_num(worker.get('in_flight'))} | {worker.get('threads') or '-'} |")
        if memory.get("agent_in_flight"):
            flight = memory["agent_in_flight"]
            lines.append("")
            lines.append(f"Agent calls in flight at the stub while RSS was sampled: median {flight['median']}, "
                         f"max {flight['max']} ({flight['samples']} samples).")
        if memory.get("connection_splits"):
            splits = ", ".join("/".join(str(count) for count in split) for split in memory["connection_splits"])
            lines.append("")
            lines.append(f"wrk's {S3_CONNECTIONS} connections per worker, each slow run: {splits}. A connection is "
                         "kept alive and stays with the worker that accepted it: a worker holding more connections "
                         "than it has threads queues turns while another has idle threads.")
    if results.get("outage"):
        lines += outage_section(results["outage"])
    extra = results.get("notes") or []
    if extra:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in extra]

    lines += ["", "## Runs", "", "| scenario | run | req/s | p50 ms | p99 ms | requests | non-2xx | socket errors |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key, _label, _what in ROWS:
        entry = scenarios.get(key)
        for index, run in enumerate(entry["runs"] if entry else [], 1):
            lines.append(f"| {key} | {index} | {_num(run['rps'])} | {_num(run['p50_ms'], 2)} | {_num(run['p99_ms'], 2)} | "
                         f"{run['requests']} | {non2xx_text(run)} | {run['socket_errors']} |")

    lines += ["", "## Machine and settings", ""]
    lines += [f"- {name}: {value}" for name, value in meta["machine"].items()]
    lines += [f"- {name}: {value}" for name, value in meta["settings"].items()]
    return "\n".join(lines) + "\n"
