"""Run every benchmark and print one table (by hand, not a test).

    PYTHONPATH=. .venv/bin/python benchmarks/run_all.py [--quick] [--only AREA ...]
        [--json FILE] [--rst] [--workdir DIR] [--rounds N]

The areas, each the ``main(argv)`` of its own module, in this order:

* ``disk`` (bench_disk.py): cold render, re-renders (fresh Python, the CLI,
  a warm process), the disk stage, the floor, the baseline and
  virt-make-fs (when installed), on the random and the real tree;
* ``fetch`` (bench_fetch.py): the Fetcher against ``curl -o``;
* ``upload`` (bench_upload.py): each storage driver against its plain tool;
* ``service`` (bench_service.py): ``cloudlets serve`` under concurrent
  creates against a plain loop of renders;
* ``queue`` (bench_queue.py): the embedded pool against Celery workers;
* ``vmdk`` (bench_vmdk.py): the native streamOptimized VMDK (cold, from
  cached grains, a whole OVA re-render) against ``qemu-img convert``;
* ``memory`` (bench_memory.py): the peak RSS of a cold render and a
  re-render of a 4 GiB image of 60,000 files, each in a fresh process.

Each area runs in a child process of its own; one whose tools or module are
missing, or that fails, is skipped with the reason. An area without an
entry in :func:`area_argv` gets its defaults, and with ``--quick`` its module's
``QUICK_ARGV`` list (skipped without one). The
table has one row per pipeline: best and median wall time, its ratio to the
area's floor (the fastest pipeline of existing tools: ``floor`` for the
disk, ``curl`` for fetch, the plain tool for upload, the plain render loop
for the service), to ``baseline`` and to ``virt-make-fs``, the peak RSS
of its largest process, and the stage times of the best run (the
renderer's ``RenderResult.timings``) or the area's own figures.
``--from-json FILE`` prints the tables of a report written before, without
running anything. ``--quick`` runs every area small (a few hundred files, megabytes, one
round) for a smoke run: its numbers mean nothing. ``--json FILE`` writes
every area's whole report; ``--rst`` also prints the table as an RST
``list-table`` for docs/performance.rst.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from benchtable import fmt_number, fmt_ratio, machine, rst_table, text_table  # noqa: E402

AREAS = ("disk", "fetch", "upload", "service", "queue", "vmdk", "memory")
HEADER = ["area", "pipeline", "best s", "median s", "x floor", "x baseline",
          "x virt-make-fs", "peak RSS MiB", "stages (best run) / notes"]


def area_argv(area: str, args: argparse.Namespace) -> list[str] | None:
    """The arguments of an area's ``main``; ``None`` to skip it in this mode."""
    rounds = ["--rounds", str(args.rounds)] if args.rounds else []
    if area == "disk":
        work = ["--workdir", str(args.workdir)] if args.workdir else []
        if args.quick:
            return [*work, "--files", "300", "--megabytes", "8", "--real-files", "300",
                    "--real-megabytes", "8", "--rounds", "1", "--warm-renders", "2"]
        return [*work, *rounds]
    if area == "fetch":
        return ["--size-mib", "32", "--rounds", "1"] if args.quick else rounds
    if area == "upload":
        return ["--size", "32M", "--rounds", "1"] if args.quick else rounds
    if area == "service":
        return ["--creates", "8", "--clients", "4"] if args.quick else []
    if area == "queue":
        return (["--renders", "4", "--concurrency", "2", "--payload-mib", "1",
                 "--sequential", "1"] if args.quick else [])
    if area == "memory":
        return ["--files", "2000", "--image-gib", "1"] if args.quick else []
    if area == "vmdk":
        return ["--megabytes", "16", "--rounds", "1"] if args.quick else rounds
    return None  # another area: its own QUICK_ARGV, or its defaults (see run_area)


#: The child that runs one area: import its module, call main(argv), write the report.
_CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
module = __import__(sys.argv[2])
report = module.main(sys.argv[4:])
with open(sys.argv[3], "w", encoding="utf-8") as handle:
    json.dump(report, handle, default=str)
"""


def run_area(area: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run the area's ``main(argv)`` in a child process of its own; never raises.

    A child of its own, not an import here: every area starts from a fresh
    interpreter whatever ran before it, and the peak RSS that its tools
    report is theirs (a process's ``ru_maxrss`` keeps the high-water mark of
    the process it was forked from, across ``exec``)."""
    module_name = f"bench_{area}"
    source = HERE / f"{module_name}.py"
    if not source.exists():
        return {"skipped": f"benchmarks/{module_name}.py does not exist (yet)"}
    argv = area_argv(area, args)
    if argv is None:
        if args.quick:
            quick = _quick_argv(source)
            if quick is None:
                return {"skipped": f"{module_name} has no QUICK_ARGV for --quick"}
            argv = quick
        else:
            argv = []
    print(f"\n=== {area}: {module_name}.py {' '.join(argv)}", flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"run-all-{area}-") as scratch:
        out = Path(scratch) / "report.json"
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(HERE), module_name, str(out),
                               *argv], stderr=subprocess.PIPE, text=True, check=False)
        sys.stderr.write(proc.stderr[-20000:])
        seconds = time.perf_counter() - started
        if proc.returncode or not out.exists():
            last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
            return {"skipped": f"{module_name} exited with code {proc.returncode}: {last}",
                    "argv": argv}
        report = json.loads(out.read_text(encoding="utf-8"))
    if not isinstance(report, dict) or not report:
        return {"skipped": f"{module_name}.main returned no report", "argv": argv}
    return {"argv": argv, "seconds": seconds, "report": report}


def _quick_argv(source: Path) -> list[str] | None:
    """A module's ``QUICK_ARGV = [...]`` (read, not imported), or ``None``."""
    for node in ast.parse(source.read_text(encoding="utf-8")).body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name) and node.targets[0].id == "QUICK_ARGV"):
            value = ast.literal_eval(node.value)
            if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                return list(value)
    return None


def _row(area: str, pipeline: str, best: float | None = None, median: float | None = None,
         ratios: dict[str, float] | None = None, rss: float | None = None,
         notes: str = "") -> dict[str, Any]:
    return {"area": area, "pipeline": pipeline, "best_s": best, "median_s": median,
            "ratios": ratios or {}, "rss_mib": rss, "notes": notes}


def rows_of(area: str, report: dict[str, Any]) -> list[dict[str, Any]]:
    """One area's report as table rows (see HEADER)."""
    rows: list[dict[str, Any]] = []
    if area == "disk":
        for kind, tree in report.get("trees", {}).items():
            for name, row in tree["pipelines"].items():
                notes = ", ".join(f"{k} {v:.2f}" for k, v in row["stages"].items())
                if name in ("rerender-cli", "cold-cli") and tree.get("identical") is not None:
                    notes = (f"identical: {'yes' if tree['identical'] else 'NO'}; " + notes)
                rows.append(_row(f"disk/{kind}", name, row["best_s"], row["median_s"],
                                 row.get("ratios"), row["rss_mib"], notes))
    elif area == "fetch":
        clients = report.get("clients", {})
        floor = clients.get("curl -o", {}).get("best_s")
        for label, row in clients.items():
            rows.append(_row("fetch", label, row["best_s"], row["median_s"],
                             {"floor": row["best_s"] / floor} if floor else {},
                             row["rss_mib"], f"{report['size_mib']} MiB, {report['server']}"))
    elif area == "upload":
        for row in report.get("rows", []):
            kind = "variant" if row["variant"] else ("judged" if row["judged"] else "other tool")
            rows.append(_row(f"upload/{row['target']}", f"{row['cloudlets']} vs {row['plain']}",
                             row["cloudlets_s"], row["cloudlets_median_s"],
                             {"floor": row["ratio"]}, row["cloudlets_rss_mib"],
                             f"{kind}; plain {row['plain_s']:.2f} s, "
                             f"{row['plain_rss_mib']:.0f} MiB"))
    elif area == "service":
        if report.get("service_renders_per_s"):
            rows.append(_row(
                "service", f"{report['creates']} creates, {report['clients']} clients",
                ratios={"floor": report["plain_renders_per_s"]
                        / report["service_renders_per_s"]},
                notes=(f"{report['service_renders_per_s']} renders/s vs plain loop "
                       f"{report['plain_renders_per_s']}; POST p99 "
                       f"{report['post_ms'].get('p99')} ms; ready p99 "
                       f"{report['ready_s'].get('p99')} s; ok {report.get('ok')}")))
    elif area == "queue":
        for mode, row in report.get("modes", {}).items():
            rows.append(_row("queue", mode, row["render_s"], None, None, None,
                             f"ready {row['seq_ready_s']:.2f} s, overhead "
                             f"{row['overhead_share']:.1%}, {row['renders_per_s']:.2f} "
                             f"renders/s, p99 {row['p99_ready_s']:.2f} s"))
        if "overhead_share" in report:
            rows.append(_row("queue", "celery overhead",
                             notes=f"{report['overhead_share']:.1%} of time to ready"))
    elif area == "vmdk":
        pipelines = report.get("pipelines", {})
        floor = pipelines.get("qemu-img", {}).get("best")
        for name, row in pipelines.items():
            rows.append(_row("vmdk", name, row["best"], row["median"],
                             {"floor": row["best"] / floor} if floor else {}, None,
                             f"{row['size'] / 1e6:.1f} MB; floor: qemu-img convert "
                             f"streamOptimized of the same {report['disk_bytes'] / 2**30:.0f} "
                             f"GiB disk"))
    elif area == "memory":
        for run in report.get("runs", []):
            rows.append(_row("memory", run["pipeline"], run["seconds"], None, None,
                             max(run["rss_mib"], run["tools_rss_mib"]),
                             f"{report['files']} files, {report['image_gib']} GiB image; "
                             f"bound {report['max_rss_mib']} MiB: "
                             f"{'ok' if report.get('ok') else 'EXCEEDED'}"))
    else:  # another area's own rows, when it gives them in this shape
        for row in report.get("rows", []):
            if isinstance(row, dict) and "pipeline" in row:
                rows.append(_row(area, str(row["pipeline"]), row.get("best_s"),
                                 row.get("median_s"), row.get("ratios"), row.get("rss_mib"),
                                 str(row.get("notes", ""))))
        if not rows:
            rows.append(_row(area, "(report)", notes="no rows in the table's shape: see JSON"))
    return rows


def cells(row: dict[str, Any]) -> list[str]:
    """A row's table cells, in HEADER's order."""
    against = row["ratios"]
    return [row["area"], row["pipeline"], fmt_number(row["best_s"]),
            fmt_number(row["median_s"]),
            *(fmt_ratio(against.get(ref)) for ref in ("floor", "baseline", "virt-make-fs")),
            fmt_number(row["rss_mib"], 0), row["notes"]]


def not_run_text(areas: dict[str, dict[str, Any]]) -> str:
    """One sentence naming what was not run and why (areas, and disk pipelines)."""
    reasons: dict[str, list[str]] = {}
    for area, result in areas.items():
        if "skipped" in result:
            reasons.setdefault(result["skipped"], []).append(area)
        for kind, tree in result.get("report", {}).get("trees", {}).items():
            for name, why in tree.get("skipped", {}).items():
                reasons.setdefault(why, []).append(f"{name} ({kind} tree)")
    if not reasons:
        return ""
    parts = [f"{', '.join(names)}: {why}" for why, names in reasons.items()]
    return "Not run: " + "; ".join(parts) + "."


def describe(info: dict[str, Any]) -> str:
    """The machine line under the table."""
    load = " ".join(f"{x:.2f}" for x in info["load"])
    return (f"{info['nproc']} CPUs ({info['cpu']}), load average {load}, Linux "
            f"{info['kernel']}, Python {info['python']}, commit {info['commit']}")


def print_report(report: dict[str, Any], *, rst: bool) -> None:
    """The table, the machine line and what was skipped; with ``rst``, the
    sentence, table and note that docs/performance.rst quotes."""
    rows, before, after = report["rows"], report["machine"], report["load_after"]
    started = datetime.datetime.fromisoformat(report["started"])
    print("\n" + text_table(HEADER, [cells(r) for r in rows], align="llrrrrrrl"))
    print(f"\n{started:%Y-%m-%d %H:%M} UTC; {describe(before)}; load after "
          + " ".join(f"{x:.2f}" for x in after))
    for area, result in report["areas"].items():
        if "skipped" in result:
            print(f"{area}: skipped ({result['skipped']})")
    if rst:
        load = " ".join(f"{x:.2f}" for x in before["load"])
        print(f"\nThe run of {started:%Y-%m-%d %H:%M} UTC of commit {before['commit']}"
              f"{' (--quick: not a measurement)' if report['quick'] else ''}: "
              f"``nproc`` {before['nproc']}, {before['cpu']}, load average {load} "
              f"before and " + " ".join(f"{x:.2f}" for x in after) + " after "
              "(other sessions share the machine).")
        print("\n" + rst_table(HEADER, [cells(r) for r in rows],
                               widths=[8, 14, 5, 5, 5, 5, 6, 5, 30]))
        not_run = not_run_text(report["areas"])
        if not_run:
            print(not_run)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the areas; :returns: the whole report (what ``--json`` writes)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small inputs, one round: a smoke run, not a measurement")
    parser.add_argument("--only", action="append", choices=AREAS,
                        help="run only these areas (repeatable)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the report here")
    parser.add_argument("--rst", action="store_true", help="also print the table as RST")
    parser.add_argument("--from-json", type=Path, metavar="FILE",
                        help="run nothing: print the tables of a report --json wrote")
    parser.add_argument("--workdir", type=Path, help="bench_disk.py's work directory")
    parser.add_argument("--rounds", type=int, help="rounds for disk, fetch and upload")
    args = parser.parse_args(argv)
    if args.from_json:
        report: dict[str, Any] = json.loads(args.from_json.read_text(encoding="utf-8"))
        print_report(report, rst=args.rst)
        return report
    started = datetime.datetime.now(datetime.UTC)
    before = machine()
    areas: dict[str, dict[str, Any]] = {}
    for area in args.only or AREAS:
        areas[area] = run_area(area, args)
    after = machine()
    rows = [row for area, result in areas.items() if "report" in result
            for row in rows_of(area, result["report"])]
    report = {"started": started.isoformat(timespec="seconds"), "quick": args.quick,
              "machine": before, "load_after": after["load"], "areas": areas, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n",
                             encoding="utf-8")
    print_report(report, rst=args.rst)
    return report


if __name__ == "__main__":
    main()
