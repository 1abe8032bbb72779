"""Regenerate the results tables in bench/README.md from the stage benchmark's
bench/results/<scale>.json files (other JSON files there are left alone):

    uv run python -m bench.report

The tables go between the `<!-- results:begin -->` and `<!-- results:end -->` markers;
everything else in the README is left as written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.scales import SCALES

HERE = Path(__file__).parent
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _cell(text: str | None) -> str:
    """A Markdown table cell: "|" (as in "FACTORY|PARAMS") escaped."""
    return (text or "").replace("|", "\\|")


def _bytes(b: float | None) -> str:
    if b is None:
        return ""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(b) >= size:
            return f"{b / size:.3g} {unit}"
    return f"{b:.0f} B"


def _num(x: float | None, unit: str = "") -> str:
    """3 significant digits with an SI prefix: 1520 -> '1.52 k'."""
    if x is None:
        return ""
    for prefix, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.3g} {prefix} {unit}".rstrip()
    return f"{x:.3g} {unit}".rstrip()


def _pct(x: float | None) -> str:
    return "" if x is None else f"{x:.1%}"


def _times(x: float | None) -> str:
    return "" if x is None else f"{x:.3g}x"


def machine_line(records: list[dict]) -> str:
    m = next((r for r in records if r["stage"] == "machine"), None)
    if m is None:
        return ""
    mach, run = m["machine"], m["run"]
    gpu = mach.get("gpu")
    parts = [f"{mach['cpu']['model']} ({', '.join(mach['cpu'].get('simd', []))})",
             f"{mach.get('usable_cpus')} usable CPUs of {mach.get('logical_cpus')}",
             f"{_bytes(mach.get('memory_bytes'))} RAM",
             f"GPU {gpu['name']}" if gpu else "no GPU",
             f"torch {mach['torch']} ({mach.get('torch_blas')}), faiss {mach['faiss']}, "
             f"open_clip {mach.get('open_clip')}",
             f"threads {mach.get('torch_threads') if not run.get('threads') else run['threads']}",
             f"device {run.get('device')}",
             "load average {:.2f} at start, {:.2f} at end".format(
                 mach["loadavg_at_start"][0], (run.get("loadavg_at_write") or [float("nan")])[0])]
    line = "; ".join(parts) + "."
    if mach.get("note"):
        line += f" **{mach['note'].rstrip('.')}.**"
    line += (f" Run {run.get('started')}, {run.get('total_seconds', 0):.0f} s, "
             f"`{run.get('command')}`.")
    return line


def table(records: list[dict]) -> str:
    head = ("| stage | variant | seconds | peak memory | peak in library call | arrays "
            "| peak / arrays | throughput | limit | fraction of limit | recall@k "
            "| speedup vs exact | target |")
    rows = [head, "|" + "---|" * 13]
    for r in records:
        if r["stage"] == "machine":
            continue
        if r.get("error"):
            rows.append(f"| {r['stage']} | {_cell(r.get('variant'))} | error: {r['error'][:80]} "
                        + "|" * 11)
            continue
        unit = r.get("throughput_unit") or ""
        is_speedup = (r.get("limit_kind") or "").startswith("torch_cdist")
        target = ""
        if r.get("target"):
            want = ", ".join(f"{k.replace('fraction_of_limit', 'fraction')} >= {v:g}"
                             for k, v in r["target"].items())
            target = f"{'met' if r.get('meets_target') else '**not met**'} ({want})"
        ratio = r.get("memory_ratio")
        ratio_s = "" if ratio is None else f"{ratio:.2f}" + ("" if ratio <= 2 else " (>2)")
        call = r.get("epoch_peak_memory_bytes", r.get("kernel_peak_memory_bytes"))
        seconds = r.get("seconds")
        sec = "" if seconds is None else f"{seconds:.3g}"
        if r.get("exact_extrapolated_from_queries") or r.get("extrapolated_from_queries") \
                or r.get("extrapolated_from_rows"):
            sec += "*"
        rec = r.get("recall_at_k")
        earlier = " †" if r.get("from_run") else ""
        rows.append(
            f"| {r['stage']} | {_cell(r.get('variant'))}{earlier} | {sec} | {_bytes(r.get('peak_memory_bytes'))} "
            f"| {_bytes(call)} | {_bytes(r.get('array_bytes'))} | {ratio_s} "
            f"| {_num(r.get('throughput'), unit)} | {_num(r.get('limit'), unit)} "
            f"| {(_times if is_speedup else _pct)(r.get('fraction_of_limit'))} "
            f"| {'' if rec is None else f'{rec:.4f}'} | {_times(r.get('speedup_vs_exact'))} "
            f"| {target} |")
    return "\n".join(rows)


def growth_line(records: list[dict]) -> str:
    """Does memory beyond the arrays grow with the data? (embed, evaluate)"""
    parts = []
    for r in records:
        if r.get("memory_growth_bytes_per_image") is not None:
            per_image = (r.get("image_bytes") or 0) / max(1, r.get("images") or 1)
            parts.append(f"embed {r['memory_growth_bytes_per_image']:,.0f} B per image (the "
                         f"image column itself: {per_image:,.0f} B per image)")
        if r.get("memory_growth_bytes_per_row") is not None:
            parts.append(f"evaluate {r['memory_growth_bytes_per_row']:,.0f} B per row")
    return ("Memory growth beyond the arrays, per extra item: " + "; ".join(parts) + ".\n\n"
            if parts else "")


def earlier_runs_line(records: list[dict]) -> str:
    """Rows kept from earlier runs by --merge: when, how, and the note given then."""
    runs = {}
    for r in records:
        if r.get("from_run"):
            runs[r["from_run"]] = (r.get("from_run_command"), r.get("from_run_note"))
    lines = [f"`†` from the run of {when}" + (f", `{cmd}`" if cmd else "")
             + (f" ({note})" if note else "") + ". " for when, (cmd, note) in sorted(runs.items())]
    return "".join(lines) + "\n\n" if lines else ""


def render(results_dir: Path = HERE / "results") -> str:
    parts = []
    order = {name: i for i, name in enumerate(SCALES)}
    files = sorted(results_dir.glob("*.json"), key=lambda p: (order.get(p.stem, 99), p.stem))
    for path in files:
        records = json.loads(path.read_text())
        if not (isinstance(records, list) and records and isinstance(records[0], dict)
                and records[0].get("stage") == "machine"):
            continue  # another tool's results (e.g. bench/seeds.py's seeds.json)
        sc = SCALES.get(path.stem)
        title = (f"{path.stem}: {sc.n:,} x {sc.dim}, {sc.classes} classes, hidden {sc.hidden}"
                 if sc else path.stem)
        parts.append(f"### {title}\n\nMachine: {machine_line(records)}\n\n{table(records)}\n\n"
                     f"{growth_line(records)}{earlier_runs_line(records)}`*` extrapolated linearly from a sample (see the record's "
                     f"`*extrapolated_from_*` field). Source: `bench/results/{path.name}`.\n")
    return "\n".join(parts) if parts else "No results yet.\n"


def update_readme(readme: Path = HERE / "README.md") -> None:
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        sys.exit(f"{readme}: markers {BEGIN} / {END} not found")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{render()}{END}{tail}")


if __name__ == "__main__":
    update_readme()
