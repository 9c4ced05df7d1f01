"""Service variants side by side, in one sitting: each round runs every variant once (bench/run.py,
one run of each scenario), the variants taking turns going first; the table shows the medians over
the rounds and each variant's ratio to the first.

    .venv/bin/python bench/compare.py --scenarios S1,S2,S3 --rounds 3 \\
        --variant "10+10:DATABASE_POOL_SIZE=10,DATABASE_MAX_OVERFLOW=10" \\
        --variant "5+0:DATABASE_POOL_SIZE=5,DATABASE_MAX_OVERFLOW=0"
    .venv/bin/python bench/compare.py --variant "before:app=../old-checkout" --variant "after:"

A variant is NAME:SETTINGS, SETTINGS a comma-separated list of NAME=VALUE service settings,
app=DIR for another checkout to serve, or run=ARGS for more arguments of run.py (--jwks). Every run uses the same stub and the same PostgreSQL
server (a database of its own per run, created and dropped by run.py).
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import report

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
COMPARED = ("rps", "p50_ms", "p99_ms")


def parse_variant(text: str) -> dict:
    name, _, settings = text.partition(":")
    if not name:
        raise argparse.ArgumentTypeError(f"a variant is NAME:SETTINGS, got {text!r}")
    variant = {"name": name, "env": [], "app_dir": None, "run_args": []}
    for setting in filter(None, (part.strip() for part in settings.split(","))):
        key, equals, value = setting.partition("=")
        if not equals:
            raise argparse.ArgumentTypeError(f"{setting!r} in {text!r} is not NAME=VALUE")
        if key == "app":
            variant["app_dir"] = value
        elif key == "run":
            variant["run_args"] += value.split()
        else:
            variant["env"].append(setting)
    return variant


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", type=parse_variant, required=True,
                        help="NAME:SETTINGS (repeat; the first is the baseline of the ratios)")
    parser.add_argument("--scenarios", default="S1,S2,S3", help="scenarios of run.py (default S1,S2,S3)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; medians over them are reported (default 3)")
    parser.add_argument("--duration", type=int, default=8, help="seconds per run (default 8)")
    parser.add_argument("--output", type=Path, help="results file (default bench/results/<date>-<commit>-<name>.md)")
    parser.add_argument("--name", default="compare", help="the results file's suffix and title (default compare)")
    parser.add_argument("--title", default="Variants side by side", help="the results file's heading")
    parser.add_argument("--note", action="append", default=[], help="a line for the results file (repeatable)")
    parser.add_argument("run_args", nargs="*", help="more arguments for run.py, after --")
    opts = parser.parse_args(argv)
    if len(opts.variant) < 2:
        parser.error("give at least two variants")
    return opts


def log(message: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_once(opts, variant: dict, workdir: Path, index: int) -> dict:
    """One run.py run of every scenario for `variant`; its results as run.py writes them."""
    output = workdir / f"{variant['name']}-{index}.json".replace("/", "_")
    command = [sys.executable, str(BENCH_DIR / "run.py"), "--runs", "1", "--duration", str(opts.duration),
               "--scenarios", opts.scenarios, "--no-results-file", "--json", str(output), *opts.run_args]
    for setting in variant["env"]:
        command += ["--env", setting]
    if variant["app_dir"]:
        command += ["--app-dir", variant["app_dir"]]
    command += variant["run_args"]
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"run.py failed for {variant['name']}:\n{done.stderr[-3000:]}")
    return json.loads(output.read_text())


def table(opts, results: dict[str, list[dict]]) -> str:
    """The Markdown table: a row per scenario and variant, medians over the rounds, ratios to the first."""
    baseline = opts.variant[0]["name"]
    medians: dict[tuple[str, str], dict] = {}
    for variant in opts.variant:
        runs_by_key: dict[str, list[dict]] = {}
        for result in results[variant["name"]]:
            for key, entry in result["scenarios"].items():
                runs_by_key.setdefault(key, []).extend(entry["runs"])
        for key, runs in runs_by_key.items():
            medians[(key, variant["name"])] = {**report.summarize(runs), "each": [run["rps"] for run in runs]}
    lines = ["| scenario | variant | req/s | p50 ms | p99 ms | req/s vs " + baseline + " | non-2xx | socket errors | req/s of each round |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for key in dict.fromkeys(key for key, _name in medians):
        for variant in opts.variant:
            entry = medians.get((key, variant["name"]))
            if entry is None:
                continue
            base = medians.get((key, baseline))
            ratio = entry["rps"] / base["rps"] if base and base["rps"] else None
            each = ", ".join(f"{rps:,.0f}" for rps in entry["each"])
            lines.append(f"| {key} | {variant['name']} | {entry['rps']:,.1f} | {entry['p50_ms']:.2f} | "
                         f"{entry['p99_ms']:.2f} | {'-' if ratio is None else f'{ratio:.2f}'} | {entry['non2xx']} | "
                         f"{entry['socket_errors']} | {each} |")
    return "\n".join(lines)


def commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def main(argv=None) -> int:
    opts = parse_args(argv)
    started = datetime.now(timezone.utc)
    results: dict[str, list[dict]] = {variant["name"]: [] for variant in opts.variant}
    with tempfile.TemporaryDirectory(prefix="chatapp-compare-") as workdir:
        for index in range(opts.rounds):
            order = opts.variant if index % 2 == 0 else list(reversed(opts.variant))
            for variant in order:
                log(f"round {index + 1}/{opts.rounds}: {variant['name']}")
                results[variant["name"]].append(run_once(opts, variant, Path(workdir), index))
    meta = results[opts.variant[0]["name"]][0]["meta"]
    variants = "\n".join(
        f"- **{variant['name']}**: {', '.join(variant['env'] + variant['run_args']) or 'the defaults'}"
        + (f", served from another checkout ({Path(variant['app_dir']).name})" if variant["app_dir"] else "")
        for variant in opts.variant)
    notes = "\n".join(f"- {note}" for note in opts.note)
    text = (f"# {opts.title}\n\n{started:%Y-%m-%d %H:%M} UTC, commit {commit()}; {opts.rounds} rounds of one "
            f"{opts.duration}-second run per scenario and variant, the variants taking turns going first; "
            f"medians over the rounds. Machine: {meta['machine']['cpus (nproc)']} cores ({meta['machine']['cpu']}), "
            f"load average at the start {meta['machine']['load average at start']}; {meta['database']}.\n\n"
            f"{variants}\n\n{table(opts, results)}\n" + (f"\n{notes}\n" if notes else ""))
    print(text)
    log(f"written to {report.write_results(text, opts.output, started, commit(), '-' + opts.name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
