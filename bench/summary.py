"""The bench output people read: the headline summary (one line per headline comparison, peftcore against its
anchor), the method legend, and the PNG chart, all generated from the rows of a run (bench/run.py) or of a CSV.

A family's bench module declares its headline comparisons (``HEADLINE``: family, op, mode, density, method,
anchor, setting), its peftcore methods (``OURS``; every other name is a reference), optionally the names that are
the floor (``FLOOR``, default dense / frozen_linear: the frozen layer alone) and, in its docstring, one
``name — description`` entry per method; the legend is read from there.
"""
from __future__ import annotations

import csv
import math
import re
import textwrap
from pathlib import Path

NUMERIC = ("ms", "ratio", "peak_mb", "saved_mb", "threads")
MODE_TEXT = {"train_step": "training step", "forward": "forward", "backward": "backward", "op": "op"}

# One colour for peftcore, one per kind of reference, the same in every panel.
KINDS = {  # kind: (legend text, colour)
    "peftcore": ("peftcore", "#d95f02"),
    "torch": ("plain PyTorch reference", "#1f78b4"),
    "peft": ("HF PEFT", "#7570b3"),
    "compiled": ("torch.compile (FlexAttention)", "#66a61e"),
    "floor": ("frozen dense layer (the floor)", "#a6a6a6"),
}


def fmt_density(v) -> str:
    """0.001 -> '0.1%', 0.05 -> '5%', 0.5 -> '50%'; '' stays ''."""
    if v in ("", None):
        return ""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return f"{f * 100:.3g}%"


def same_density(a, b) -> bool:
    if a in ("", None) or b in ("", None):
        return a in ("", None) and b in ("", None)
    return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-12)


DEFAULT_FLOOR = frozenset({"dense", "frozen_linear"})


def method_kind(row: dict, ours, floor=DEFAULT_FLOOR) -> str:
    m = row["method"]
    if m in ours or m == row.get("op"):  # op rows name the peftcore op itself
        return "peftcore"
    if m in floor:
        return "floor"
    if m.startswith("peft"):
        return "peft"
    if m.startswith("flex"):
        return "compiled"
    return "torch"


_ENTRY = re.compile(r"^(\s*)(?:\([a-z]\)\s+)?([A-Za-z_][\w.]*(?:<[\w ]+>)?)\s+—\s+(.*)$")


def parse_methods(doc: str) -> dict:
    """{method name: short description} from a bench module's docstring: every ``[(x)] name — text`` line (with
    its deeper-indented continuation lines), the text up to its first top-level ';'. A name ending in ``<...>``
    (``token_elim_<keep>``) stands for every name with that prefix."""
    out, cur, indent = {}, None, 0
    for line in (doc or "").splitlines():
        m = _ENTRY.match(line)
        if m:
            cur, indent = m.group(2), len(m.group(1))
            out[cur] = m.group(3).strip()
        elif cur is not None and line.strip() and len(line) - len(line.lstrip()) > indent:
            out[cur] += " " + line.strip()
        else:
            cur = None
    return {k: _first_clause(v) for k, v in out.items()}


def _first_clause(text: str) -> str:
    depth = 0
    for i, ch in enumerate(text):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == ";" and depth == 0:
            return text[:i].strip()
    return text.rstrip(".;").strip()


def describe(methods: dict, name: str) -> str:
    if name in methods:
        return methods[name]
    for key, text in methods.items():
        if key.endswith(">") and name.startswith(key[:key.index("<")]):
            return text
    return ""


def read_rows(path: Path) -> list:
    """The rows of a bench CSV, numbers parsed; for every family only the rows of its latest run (timestamp)."""
    with Path(path).open() as f:
        rows = list(csv.DictReader(f))
    latest = {}
    for r in rows:
        latest[r["family"]] = max(latest.get(r["family"], ""), r["timestamp"])
    out = []
    for r in rows:
        if r["timestamp"] != latest[r["family"]]:
            continue
        for k in NUMERIC:
            if r.get(k) not in ("", None):
                r[k] = float(r[k])
        out.append(r)
    return out


def headline_lines(rows: list, specs: list) -> list:
    """One dict per headline comparison found in rows (a --full run may hold a spec's comparison in several cases).

    A spec's anchor row is the anchor's at the spec's density when the anchor has one there, else its row without a
    density (a baseline measured once per case)."""
    lines = []
    for spec in specs:
        mine = [r for r in rows if r["family"] == spec["family"] and r["op"] == spec["op"]
                and r["mode"] == spec["mode"] and r["method"] == spec["method"]
                and same_density(r["density"], spec["density"])]
        for r in mine:
            peers = [a for a in rows if a["family"] == r["family"] and a["op"] == r["op"] and a["case"] == r["case"]
                     and a["mode"] == r["mode"] and a["method"] == spec["anchor"]]
            anchor = ([a for a in peers if same_density(a["density"], spec["density"])]
                      or [a for a in peers if a["density"] in ("", None)] or [None])[0]
            if anchor is None:
                continue
            d = fmt_density(spec["density"])
            lines.append(dict(
                family=r["family"], op=r["op"], case=r["case"], mode=r["mode"],
                setting=spec["setting"].format(d) if spec.get("setting") and d else d,
                method=r["method"], anchor=anchor["method"], density=r["density"], ms=r["ms"], anchor_ms=anchor["ms"],
                ratio=r["ms"] / anchor["ms"], peak_mb=r["peak_mb"], anchor_peak_mb=anchor["peak_mb"],
                saved_mb=r.get("saved_mb", ""), anchor_saved_mb=anchor.get("saved_mb", ""),
                machine=r.get("machine", ""), torch=r.get("torch", ""), spec=spec))
    return lines


def group_rows(rows: list, line: dict) -> list:
    """The rows charted beside a headline line: its case and mode, at its density or without one."""
    return [r for r in rows if r["family"] == line["family"] and r["op"] == line["op"] and r["case"] == line["case"]
            and r["mode"] == line["mode"] and (r["density"] in ("", None)
                                               or same_density(r["density"], line["density"]))]


def _kind(r, spec):
    return method_kind(r, spec.get("ours", ()), spec.get("floor", DEFAULT_FLOOR))


def _ratio_text(ratio: float) -> str:
    if abs(ratio - 1) < 0.005:
        return f"{ratio:.2f} (parity)"
    if ratio < 1:
        return f"{ratio:.2f} ({1 / ratio:.2f}× faster)"
    return f"{ratio:.2f} ({ratio:.2f}× slower)"


def _mb(v) -> str:
    return "" if v in ("", None) or (isinstance(v, float) and math.isnan(v)) else f"{float(v):.1f}"


def summary_table(lines: list):
    """(header, rows of strings) of the summary."""
    saved = any(_mb(ln["saved_mb"]) or _mb(ln["anchor_saved_mb"]) for ln in lines)
    header = ["family", "case", "setting", "measures", "peftcore", "anchor", "ms", "anchor ms",
              "time ratio (peftcore / anchor)", "peak MB", "anchor peak MB"]
    if saved:
        header += ["saved for bwd MB", "anchor saved MB"]
    body = []
    for ln in lines:
        cells = [ln["family"], ln["case"], ln["setting"], MODE_TEXT.get(ln["mode"], ln["mode"]), ln["method"],
                 ln["anchor"], f"{ln['ms']:.2f}", f"{ln['anchor_ms']:.2f}", _ratio_text(ln["ratio"]),
                 _mb(ln["peak_mb"]), _mb(ln["anchor_peak_mb"])]
        if saved:
            cells += [_mb(ln["saved_mb"]), _mb(ln["anchor_saved_mb"])]
        body.append(cells)
    return header, body


def legend(rows: list, lines: list) -> list:
    """[(family, method, kind, description)] for every method charted beside a headline line."""
    out, seen = [], set()
    for ln in lines:
        spec = ln["spec"]
        for r in sorted(group_rows(rows, ln), key=lambda r: _order(r, ln)):
            key = (ln["family"], r["method"])
            if key in seen:
                continue
            seen.add(key)
            kind = _kind(r, spec)
            out.append((ln["family"], r["method"], KINDS[kind][0], describe(spec.get("methods", {}), r["method"])))
    return out


def _order(r, line):
    """Chart / legend order: peftcore's headline method, the anchor, the other references, the floor last."""
    kind = _kind(r, line["spec"])
    return (0 if r["method"] == line["method"] else 1 if r["method"] == line["anchor"] else
            2 if kind == "peftcore" else 4 if kind == "floor" else 3, r["method"])


def render_screen(lines: list) -> str:
    """Two lines per headline: family, peftcore vs anchor, what is measured, the ratio, ms and peak memory of both;
    then the case and setting."""
    first = []
    for ln in lines:
        saved = ""
        if _mb(ln["saved_mb"]) or _mb(ln["anchor_saved_mb"]):
            saved = f"saved for bwd {_mb(ln['saved_mb']) or '-'} / {_mb(ln['anchor_saved_mb']) or '-'} MB"
        first.append([ln["family"], f"{ln['method']} vs {ln['anchor']}", MODE_TEXT.get(ln["mode"], ln["mode"]),
                      _ratio_text(ln["ratio"]), f"{ln['ms']:.1f} / {ln['anchor_ms']:.1f} ms",
                      f"peak {_mb(ln['peak_mb'])} / {_mb(ln['anchor_peak_mb'])} MB", saved])
    header = ["family", "peftcore vs anchor", "measures", "time ratio", "time", "memory", ""]
    widths = [max(len(h), *(len(f[i]) for f in first)) if first else len(h) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    out.append("-" * len(out[0]))
    for ln, f in zip(lines, first):
        out.append("  ".join(c.ljust(w) for c, w in zip(f, widths)).rstrip())
        out.append(" " * (widths[0] + 2) + ln["case"] + (f"; {ln['setting']}" if ln["setting"] else ""))
    return "\n".join(out)


def render_md(header, body, right_from: int = 6) -> str:
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---:" if i >= right_from else "---" for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(esc(c) for c in b) + " |" for b in body]
    return "\n".join(out)


NOTE = ("Time ratio: peftcore's time / the anchor's, both measured side by side in the same interleaved rounds "
        "(median; < 1: peftcore is faster). Peak MB: what one call allocates above what it held before "
        "(bench/common.py). Method names are explained below; every row of the run is in the CSV beside this file.")


def missing(lines: list, specs: list) -> list:
    """Texts naming the headline comparisons that have no line (their family was not run)."""
    found = {(ln["family"], ln["op"]) for ln in lines}
    return [f"{s['family']} ({s['method']} against {s['anchor']})" for s in specs if (s["family"], s["op"]) not in found]


def write_summary(lines: list, rows: list, md_path: Path, csv_path: Path, header_line: str, specs=()) -> str:
    """Writes the summary's .md and .csv; returns the text printed on screen (table + legend)."""
    header, body = summary_table(lines)
    leg = legend(rows, lines)
    absent = missing(lines, specs)
    md = ["# peftcore bench: headline comparisons", "", header_line, "", NOTE, "", render_md(header, body), ""]
    if absent:
        md += ["Not in this run: " + "; ".join(absent) + ".", ""]
    md += ["## Methods", "", "| family | method | kind | what it is |", "|---|---|---|---|"]
    md += [f"| {f} | {m} | {k} | {d.replace('|', chr(92) + '|')} |" for f, m, k, d in leg]
    md_path.write_text("\n".join(md) + "\n")
    fields = ["family", "op", "case", "setting", "mode", "method", "anchor", "density", "ms", "anchor_ms", "ratio",
              "peak_mb", "anchor_peak_mb", "saved_mb", "anchor_saved_mb", "machine", "torch"]
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for ln in lines:
            w.writerow(ln)
    width = 118
    text = ["Headline comparisons — " + header_line, textwrap.fill(NOTE, width), "", render_screen(lines), ""]
    if absent:
        text += [textwrap.fill("Not in this run: " + "; ".join(absent) + ".", width), ""]
    text.append("Methods:")
    name_w = max((len(f"{f}/{m}") for f, m, _, _ in leg), default=10)
    for f, m, k, d in leg:
        text.append(textwrap.fill(f"{k}: {d}" if d else k, width, initial_indent=f"  {f'{f}/{m}'.ljust(name_w)}  ",
                                  subsequent_indent=" " * (name_w + 4)))
    return "\n".join(text)


def write_png(rows: list, lines: list, path: Path, title: str):
    """One panel pair per headline line (time against the anchor, peak memory), in a grid 1600 px wide (2 pairs a
    row, 3 when there are more than 8); peftcore in one colour, each kind of reference in its own, throughout."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if not lines:
        return False
    per_row = 2 if len(lines) <= 8 else 3
    nrows = -(-len(lines) // per_row)
    row_h = 2.9 if per_row == 2 else 2.6
    fig = plt.figure(figsize=(16, 0.8 + row_h * nrows), dpi=100, layout="constrained")
    top, body = fig.subfigures(2, 1, height_ratios=[0.8, row_h * nrows])
    subs = body.subfigures(nrows, per_row, squeeze=False, wspace=0.03, hspace=0.04)
    small = 7 if per_row == 3 else 8
    box = dict(facecolor="white", edgecolor="none", pad=0.3, alpha=0.8)
    used = set()
    for i, ln in enumerate(lines):
        sub = subs[i // per_row][i % per_row]
        grp = sorted(group_rows(rows, ln), key=lambda r: _order(r, ln))
        labels = [r["method"] + (f" {fmt_density(r['density'])}" if r["density"] not in ("", None) else "")
                  + (" (anchor)" if r["method"] == ln["anchor"] else "") for r in grp]
        kinds = [_kind(r, ln["spec"]) for r in grp]
        used.update(kinds)
        colors = [KINDS[k][1] for k in kinds]
        times = [r["ms"] / ln["anchor_ms"] for r in grp]
        mems = [float(r["peak_mb"]) if r["peak_mb"] not in ("", None) else 0.0 for r in grp]
        setting = f", {ln['setting']}" if ln["setting"] else ""
        head = "\n".join(textwrap.wrap(f"{ln['family']}: {ln['case']}", 95 if per_row == 2 else 64)[:2])
        sub.suptitle(f"{head}\n{MODE_TEXT.get(ln['mode'], ln['mode'])}{setting}", fontsize=small + 2,
                     fontweight="bold")
        ax_t, ax_m = sub.subplots(1, 2, sharey=True, gridspec_kw=dict(width_ratios=[1.15, 1]))
        y = range(len(grp))
        ax_t.barh(y, times, color=colors, height=0.7)
        ax_t.axvline(1.0, color="k", lw=0.8, ls="--")
        ax_t.set_yticks(list(y), labels, fontsize=small)
        ax_t.invert_yaxis()
        ax_t.set_title("time / the anchor's (lower is better)", fontsize=small + 1)
        ax_t.set_xlim(0, max(times) * 1.3)
        for j, v in enumerate(times):
            ax_t.text(v, j, f" {v:.2f}×", va="center", fontsize=small, bbox=box)
        ax_m.barh(y, mems, color=colors, height=0.7)
        ax_m.set_title("peak memory of one call, MB", fontsize=small + 1)
        ax_m.set_xlim(0, max(mems) * 1.35 if max(mems) > 0 else 1.0)  # all zero: a plain 0..1 axis
        for j, v in enumerate(mems):
            ax_m.text(v, j, f" {v:.1f}", va="center", fontsize=small, bbox=box)
        for ax in (ax_t, ax_m):
            ax.tick_params(axis="x", labelsize=small)
            ax.spines[["top", "right"]].set_visible(False)
    for j in range(len(lines), nrows * per_row):
        subs[j // per_row][j % per_row].set_visible(False)
    top.suptitle(title, fontsize=13)
    handles = [Patch(color=KINDS[k][1], label=KINDS[k][0]) for k in KINDS if k in used]
    top.legend(handles=handles, loc="lower center", ncols=len(handles), fontsize=10, frameon=False)
    fig.savefig(path)
    plt.close(fig)
    return True
