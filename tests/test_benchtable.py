"""The benchmarks' ratio and table logic (benchmarks/benchtable.py, run_all.py).

The benchmarks themselves are run by hand (``benchmarks/run_all.py --quick``
takes more than a minute: too long for the suite); this checks the
arithmetic and the tables they print and that docs/performance.rst quotes,
on reports written here.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import docutils.core
import docutils.nodes
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench() -> Iterator[dict[str, ModuleType]]:
    saved_path, saved_modules = list(sys.path), set(sys.modules)
    try:
        yield {name: _load(name) for name in ("benchtable", "bench_disk", "run_all")}
    finally:
        sys.path[:] = saved_path
        for name in set(sys.modules) - saved_modules:
            del sys.modules[name]


def test_ratios_divide_by_each_measured_reference(bench: dict[str, ModuleType]) -> None:
    got = bench["benchtable"].ratios({"render": 6.0, "floor": 3.0, "baseline": 4.0})
    assert got["render"] == {"floor": 2.0, "baseline": 1.5}
    assert got["floor"] == {"floor": 1.0, "baseline": 0.75}
    assert "virt-make-fs" not in got["render"]  # not run: no ratio, not a zero


def test_ratios_skip_a_reference_without_a_time(bench: dict[str, ModuleType]) -> None:
    assert bench["benchtable"].ratios({"render": 1.0, "floor": 0.0}) == {"render": {},
                                                                        "floor": {}}


def test_text_table_aligns_and_refuses_ragged_rows(bench: dict[str, ModuleType]) -> None:
    table = bench["benchtable"].text_table(["name", "s", "notes"],
                                           [["render", "12.50", "a"], ["floor", "3.00", "bb"]],
                                           align="lrl")
    lines = table.splitlines()
    assert lines[0] == "name        s  notes"
    assert lines[1] == "------  -----  -----"
    assert lines[3] == "floor    3.00  bb"
    with pytest.raises(ValueError, match="as many cells"):
        bench["benchtable"].text_table(["a", "b"], [["1"]])


def _rst_rows(text: str) -> list[list[str]]:
    tree = docutils.core.publish_doctree(text, settings_overrides={"report_level": 2,
                                                                   "halt_level": 2})
    rows = []
    for row in tree.findall(docutils.nodes.row):
        rows.append([entry.astext() for entry in row.findall(docutils.nodes.entry)])
    return rows


def test_rst_table_is_a_valid_list_table(bench: dict[str, ModuleType]) -> None:
    text = bench["benchtable"].rst_table(["a", "b"], [["1", ""], ["-", "- x"], ["*", "2.00x"]],
                                         widths=[1, 3])
    assert _rst_rows(text) == [["a", "b"], ["1", ""], ["-", "- x"], ["*", "2.00x"]]


def _run(total: float, rss: float = 10.0, **extra: Any) -> dict[str, Any]:
    return {"total": total, "rss_mib": rss, **extra}


def test_summary_takes_the_best_run_and_its_stages(bench: dict[str, ModuleType]) -> None:
    summary = bench["bench_disk"].summarize({
        "render": [_run(9.0, 50, **{"stage:rootfs": 7.0}),
                   _run(6.0, 40, **{"stage:rootfs": 4.0}),
                   _run(7.0, 45, **{"stage:rootfs": 5.0})],
        "floor": [_run(3.0), _run(2.0)],
        "baseline": [_run(4.0, extract=1.0, raw=3.0)],
    })
    render = summary["render"]
    assert (render["best_s"], render["median_s"], render["rss_mib"]) == (6.0, 7.0, 50)
    assert render["stages"] == {"rootfs": 4.0}
    assert render["ratios"] == {"floor": 3.0, "baseline": 1.5}
    assert summary["baseline"]["stages"] == {"extract": 1.0, "raw": 3.0}
    assert summary["floor"]["median_s"] == 2.5


def test_run_all_rows_carry_ratios_identity_and_notes(bench: dict[str, ModuleType]) -> None:
    disk = {"trees": {"real": {"identical": False, "pipelines": bench["bench_disk"].summarize({
        "rerender-cli": [_run(1.5, **{"stage:disk": 0.5})],
        "floor": [_run(3.0)],
    })}}}
    run_all = bench["run_all"]
    rows = run_all.rows_of("disk", disk)
    assert [run_all.cells(r) for r in rows] == [
        ["disk/real", "rerender-cli", "1.50", "1.50", "0.50x", "-", "-", "10",
         "identical: NO; disk 0.50"],
        ["disk/real", "floor", "3.00", "3.00", "1.00x", "-", "-", "10", ""],
    ]
    fetch = {"size_mib": 64, "server": "nginx", "clients": {
        "curl -o": {"best_s": 0.5, "median_s": 0.6, "rss_mib": 5.0},
        "Fetcher.fetch": {"best_s": 0.6, "median_s": 0.7, "rss_mib": 40.0}}}
    ratio = {r["pipeline"]: r["ratios"]["floor"] for r in run_all.rows_of("fetch", fetch)}
    assert ratio == {"curl -o": 1.0, "Fetcher.fetch": pytest.approx(1.2)}
    odd = run_all.rows_of("other", {"something": 1})
    assert odd[0]["notes"] == "no rows in the table's shape: see JSON"
    vmdk = {"disk_bytes": 2**30, "pipelines": {
        "qemu-img": {"best": 12.0, "median": 13.0, "size": 110e6},
        "native-raw": {"best": 2.0, "median": 2.5, "size": 122e6}}}
    assert {r["pipeline"]: r["ratios"]["floor"] for r in run_all.rows_of("vmdk", vmdk)} == {
        "qemu-img": 1.0, "native-raw": pytest.approx(1 / 6)}
    memory = {"files": 60000, "image_gib": 4, "max_rss_mib": 200, "ok": False, "runs": [
        {"pipeline": "render", "seconds": 4.0, "rss_mib": 90.0, "tools_rss_mib": 250.0}]}
    [row] = run_all.rows_of("memory", memory)
    assert row["rss_mib"] == 250.0 and row["notes"].endswith("EXCEEDED")


def test_not_run_names_areas_and_pipelines_by_reason(bench: dict[str, ModuleType]) -> None:
    areas = {"vmdk": {"skipped": "no module"},
             "disk": {"report": {"trees": {
                 "random": {"skipped": {"virt-make-fs": "not installed"}},
                 "real": {"skipped": {"virt-make-fs": "not installed", "floor": "failed"}}}}},
             "fetch": {"report": {}}}
    assert bench["run_all"].not_run_text(areas) == (
        "Not run: vmdk: no module; virt-make-fs (random tree), virt-make-fs (real tree): "
        "not installed; floor (real tree): failed.")
    assert bench["run_all"].not_run_text({"fetch": {"report": {}}}) == ""
