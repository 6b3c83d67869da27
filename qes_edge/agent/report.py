"""`qes-edge report`: one self-contained HTML file (inline CSS, the figure inlined as base64)
and the figure as a PNG beside it, from a verified run's record (qes_edge.ledger.runlog).

The figure has three panels sharing the step axis: (a) the training reward per step (mean,
min-max band over the members) with the held-out metrics on a second axis; (b) where a step's
time goes (perturb, eval, restore, update, digest, stacked); (c) the step's peak resident
memory (timings key `rss_mb`) against the inference baseline (an evaluation row of split
`memory`: `inference_rss_mb`, `loaded_rss_mb`).  matplotlib is imported only here, and only
when a report is made (the `report` extra)."""

from __future__ import annotations

import base64
import html
import io
import json
import statistics
import time
from pathlib import Path

from qes_edge.ledger.runlog import PHASES, RunRecord, after, eval_text, fmt_value, metrics_text, part_means

PHASE_LABELS = {"perturb_s": "perturb", "eval_s": "eval", "restore_s": "restore", "update_s": "update",
                "digest_s": "digest"}
PHASE_COLORS = {"perturb_s": "#4c72b0", "eval_s": "#dd8452", "restore_s": "#55a868", "update_s": "#c44e52",
                "digest_s": "#8172b3"}
HELDOUT_COLORS = ("#2a9d8f", "#e76f51", "#6a4c93", "#8d6e63", "#1982c4", "#ff595e")


# -- numbers ---------------------------------------------------------------------------------

def _t(row: dict, key: str) -> float | None:
    v = row["timings"].get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def step_seconds(row: dict) -> float | None:
    parts = [_t(row, k) for k in PHASES]
    parts = [p for p in parts if p is not None]
    return sum(parts) if parts else None


def memory_baseline(record: RunRecord) -> dict:
    """The latest `memory` evaluation's numbers (inference_rss_mb, loaded_rss_mb, ...), or {}."""
    rows = record.evals_of("memory")
    if not rows:
        return {}
    return {k: v for k, v in rows[-1].items() if k not in ("event", "step", "split")}


def heldout_metrics(record: RunRecord) -> list[str]:
    """The numeric held-out metrics, in the order they first appear."""
    names: list[str] = []
    for e in record.evals_of("heldout"):
        for k, v in e.items():
            if k not in ("event", "step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool) \
                    and k not in names:
                names.append(k)
    return names


def _quiet(s: dict) -> str:
    """The no-signal steps in words: how many, which, and the alarm of a streak at the end."""
    from qes_edge.training.no_signal import alarm
    steps = s["no_signal_steps"]
    if not steps:
        return "none"
    shown = ", ".join(map(str, steps[:12])) + (" …" if len(steps) > 12 else "")
    tail = alarm(*s["no_signal_streak"])
    return f"{len(steps)} (steps {shown})" + (f"; {tail}" if tail else "")


def summary(record: RunRecord) -> dict:
    """The report's summary numbers (None where the run did not record what they need)."""
    steps = record.steps
    rewards = [(r["step"], r["reward"]) for r in steps if r["reward"] is not None]
    best = max(rewards, key=lambda x: x[1]) if rewards else None
    times = [t for t in (step_seconds(r) for r in steps) if t is not None]
    sums = {k: sum(v for v in (_t(r, k) for r in steps) if v is not None) for k in PHASES}
    has = {k: any(_t(r, k) is not None for r in steps) for k in PHASES}
    overhead = None
    if all(has[k] for k in ("perturb_s", "restore_s", "update_s", "eval_s")) and sums["eval_s"] > 0:
        overhead = (sums["perturb_s"] + sums["restore_s"] + sums["update_s"]) / sums["eval_s"]
    rss = [v for v in (_t(r, "rss_mb") for r in steps) if v is not None]
    base = memory_baseline(record)
    inference = base.get("inference_rss_mb")
    inference = float(inference) if isinstance(inference, (int, float)) and inference > 0 else None
    heldout = record.evals_of("heldout")
    metrics = lambda e: {k: v for k, v in e.items() if k not in ("event", "step", "split")}  # noqa: E731
    from qes_edge.training.no_signal import KEY, streak
    from qes_edge.ledger.runlog import best_heldout
    quiet = [r["step"] for r in steps if (r.get("timings") or {}).get(KEY)]
    return {
        "no_signal_steps": quiet, "no_signal_streak": streak(r.get("timings") for r in steps),
        "first_reward": rewards[0][1] if rewards else None,
        "last_reward": rewards[-1][1] if rewards else None,
        "best_reward": best[1] if best else None, "best_step": best[0] if best else None,
        "first_heldout": metrics(heldout[0]) if heldout else None,
        "first_heldout_step": heldout[0]["step"] if heldout else None,
        "last_heldout": metrics(heldout[-1]) if heldout else None,
        "last_heldout_step": heldout[-1]["step"] if heldout else None,
        "best_heldout": best_heldout(heldout, record.n_steps),
        "median_step_s": statistics.median(times) if times else None,
        "qes_overhead": overhead,
        "peak_rss_mb": max(rss) if rss else None,
        "inference_rss_mb": inference,
        "peak_vs_inference": max(rss) / inference if rss and inference else None,
    }


# -- the figure ------------------------------------------------------------------------------

def figure_png(record: RunRecord) -> bytes:
    """The three panels as PNG bytes (matplotlib's Agg canvas, no pyplot: no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    steps = record.steps
    x = [r["step"] for r in steps]
    fig = Figure(figsize=(10, 11), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax_r, ax_t, ax_m = fig.subplots(3, 1, sharex=True, height_ratios=(1.2, 1, 0.9))
    run = record.run
    fig.suptitle(f"run {run.run_id[:8]} · {run.base_name} · task {run.config.get('task')} · "
                 f"{record.n_steps} steps", fontsize=12)

    # (a) reward, and the held-out metrics on their own axis
    ok = [(r["step"], r["reward"], r["min_reward"], r["max_reward"]) for r in steps if r["reward"] is not None]
    handles, ax_h = [], ax_r
    if ok:
        sx, mean, lo, hi = zip(*ok)
        band = ax_r.fill_between(sx, lo, hi, color="#4c72b0", alpha=0.2, linewidth=0, label="members' min–max")
        (line,) = ax_r.plot(sx, mean, color="#4c72b0", marker="o" if len(sx) <= 60 else None, markersize=3.5,
                            linewidth=1.6, label="training reward (mean)")
        handles += [line, band]
    ax_r.set_ylabel("training reward")
    ax_r.set_title("(a) reward per step", loc="left", fontsize=11)
    ax_r.grid(alpha=0.3)
    names = heldout_metrics(record)
    if names:
        # one scale when everything is a fraction (rewards, accuracies): then a held-out reward
        # below the training reward is drawn below it; another scale otherwise
        values = [v for r in ok for v in r[1:]] + [e[k] for e in record.evals_of("heldout") for k in names
                                                   if isinstance(e.get(k), (int, float))]
        shared = all(0.0 <= v <= 1.0 for v in values)
        ax_h = ax_r if shared else ax_r.twinx()
        if shared:
            ax_r.set_ylabel("reward · held-out metric")
        for i, k in enumerate(names):
            pts = [(e["step"], e[k]) for e in record.evals_of("heldout") if isinstance(e.get(k), (int, float))]
            if pts:
                ex, ey = zip(*pts)
                (h,) = ax_h.plot(ex, ey, color=HELDOUT_COLORS[i % len(HELDOUT_COLORS)], linestyle="--", marker="s",
                                 markersize=5, linewidth=1.4, label=f"held-out {k}")
                handles.append(h)
        if not shared:
            ax_h.set_ylabel("held-out metric")
    if handles:
        ax_r.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01 if ax_h is ax_r else 1.08, 1.0),
                    fontsize=8.5, frameon=False)
    else:
        ax_r.text(0.5, 0.5, "no reward recorded", transform=ax_r.transAxes, ha="center", va="center", color="0.4")
        ax_r.set_yticks([])

    # (b) step time by phase
    bottom = [0.0] * len(steps)
    any_time = False
    stacked = len(steps) <= 150
    for k in PHASES:
        vals = [_t(r, k) or 0.0 for r in steps]
        if not any(vals):
            continue
        any_time = True
        if stacked:
            ax_t.bar(x, vals, bottom=bottom, width=0.8, color=PHASE_COLORS[k], label=PHASE_LABELS[k])
        else:
            ax_t.fill_between(x, bottom, [b + v for b, v in zip(bottom, vals)], color=PHASE_COLORS[k],
                              linewidth=0, label=PHASE_LABELS[k], step="mid")
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax_t.set_ylabel("seconds")
    ax_t.set_title("(b) step time by phase", loc="left", fontsize=11)
    ax_t.grid(axis="y", alpha=0.3)
    if any_time:
        h, lab = ax_t.get_legend_handles_labels()
        ax_t.legend(h[::-1], lab[::-1], loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8.5, frameon=False)
    else:
        ax_t.text(0.5, 0.5, "timings not recorded", transform=ax_t.transAxes, ha="center", va="center", color="0.4")
        ax_t.set_yticks([])

    # (c) memory
    ax_m.set_title("(c) peak resident memory per step", loc="left", fontsize=11)
    ax_m.set_ylabel("MB")
    ax_m.set_xlabel("step")
    ax_m.grid(alpha=0.3)
    rss = [(r["step"], _t(r, "rss_mb")) for r in steps if _t(r, "rss_mb") is not None]
    base = memory_baseline(record)
    drawn = []
    if rss:
        mx, my = zip(*rss)
        inf = base.get("inference_rss_mb")
        ratio = f", {max(my) / inf:.2f}× inference" if isinstance(inf, (int, float)) and inf > 0 else ""
        drawn += ax_m.plot(mx, my, color="#c44e52", marker="o" if len(mx) <= 60 else None, markersize=3.5,
                           linewidth=1.6, label=f"training step peak RSS\n(max {max(my):.1f} MB{ratio})")
    # the memory evaluation's numbers as levels: the inference baseline first, then whatever else
    # it recorded (loaded_rss_mb, peak_rss_mb, ...) under its own name
    others = [k for k, v in base.items() if k != "inference_rss_mb" and isinstance(v, (int, float))
              and not isinstance(v, bool)]
    for i, key in enumerate(["inference_rss_mb", *others]):
        v = base.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            label = {"inference_rss_mb": "inference baseline", "loaded_rss_mb": "model loaded",
                     "peak_rss_mb": "peak before training"}.get(key, key)
            drawn.append(ax_m.axhline(v, color="0.2" if i == 0 else "0.45", linewidth=1.3 if i == 0 else 1.0,
                                      linestyle=("-", ":", "--", "-.")[min(i, 3)], label=f"{label} ({v:.1f} MB)"))
    if drawn:
        ax_m.legend(handles=drawn, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8.5, frameon=False)
        ys = [v for line in drawn for v in line.get_ydata()]
        lo, hi = min(ys), max(ys)
        pad = max((hi - lo) * 0.15, hi * 0.02, 1.0)
        ax_m.set_ylim(max(0.0, lo - pad), hi + pad)
    missing = [w for w, have in (("per-step RSS", bool(rss)), ("inference baseline", "inference_rss_mb" in base))
               if not have]
    if missing:
        text = "not recorded" if len(missing) == 2 else f"{missing[0]}: not recorded"
        ax_m.text(0.5, 0.5 if len(missing) == 2 else 0.1, text, transform=ax_m.transAxes, ha="center", va="center",
                  color="0.4", fontsize=10 if len(missing) == 2 else 8.5)
        if len(missing) == 2:
            ax_m.set_yticks([])
    ax_m.xaxis.set_major_locator(MaxNLocator(integer=True))
    if x:
        last = max(x[-1], max((e["step"] for e in record.evals), default=0))
        ax_m.set_xlim(x[0] - 0.6, last + 0.6)

    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


# -- the page --------------------------------------------------------------------------------

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 72em;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; margin-bottom: .2em; } h2 { font-size: 1.15em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: .5em 0; }
th, td { padding: .2em .7em; border-bottom: 1px solid #e3e3e3; text-align: left; vertical-align: top; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f5f5f5; } code { font-size: .95em; }
.muted { color: #777; } img { max-width: 100%; border: 1px solid #eee; }
tr.eval td { background: #f3faf8; color: #2a6f66; }
.cols { display: flex; flex-wrap: wrap; gap: 2em; align-items: flex-start; }
details summary { cursor: pointer; color: #555; margin: .5em 0; }
"""


def _e(v) -> str:
    return html.escape(str(v), quote=True)


def _num(v, fmt="{:.3f}") -> str:
    return "—" if v is None else fmt.format(v)


def _metrics(m: dict | None) -> str:
    return metrics_text(m) if m else "not recorded"


def _table(rows, header=None, numeric=()) -> str:
    """An HTML table of escaped cells; a row that is a str is one cell across every column."""
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f'<th{" class=n" if i in numeric else ""}>{_e(h)}</th>'
                                    for i, h in enumerate(header)) + "</tr>")
    for row in rows:
        if isinstance(row, str):
            out.append(f"<tr class=eval><td colspan={len(header or [1])}>{_e(row)}</td></tr>")
            continue
        out.append("<tr>" + "".join(f'<td{" class=n" if i in numeric else ""}>{_e(c)}</td>'
                                    for i, c in enumerate(row)) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def page(record: RunRecord, s: dict, png: bytes) -> str:
    run = record.run
    cfg = run.config
    created = record.steps[0]["created"] if record.steps else None
    head_rows = [["model", run.base_name], ["base sha256", run.base_sha256[:16] + "…"], ["run id", run.run_id],
                 ["task", cfg.get("task")], ["steps", record.n_steps], ["head hash", record.head],
                 ["ledger", str(record.path)],
                 ["first step", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created)) if created else "—"]]
    cfg_rows = [[k, v if isinstance(v, str) else json.dumps(v)] for k, v in sorted(cfg.items())]
    best = f"{_num(s['best_reward'])} (step {s['best_step']})" if s["best_reward"] is not None else "—"
    fh = f" ({after(s['first_heldout_step'])})" if s["first_heldout"] else ""
    lh = f" ({after(s['last_heldout_step'])})" if s["last_heldout"] else ""
    best_held = "—"
    if s["best_heldout"] is not None:
        step, by, score = s["best_heldout"]
        best_held = f"{by} {score:.3f} ({after(step)})" + (
            "; the run scored less since: qes-edge export --step best exports this point"
            if step < s["last_heldout_step"] else "")
    peak = "not recorded"
    if s["peak_rss_mb"] is not None and s["inference_rss_mb"] is not None:
        peak = (f"{s['peak_vs_inference']:.3f}× ({s['peak_rss_mb']:.1f} MB peak / "
                f"{s['inference_rss_mb']:.1f} MB inference)")
    elif s["peak_rss_mb"] is not None:
        peak = f"{s['peak_rss_mb']:.1f} MB peak (inference baseline not recorded)"
    elif s["inference_rss_mb"] is not None:
        peak = f"per-step RSS not recorded (inference {s['inference_rss_mb']:.1f} MB)"
    sum_rows = [
        ["first training reward", _num(s["first_reward"])], ["last training reward", _num(s["last_reward"])],
        ["best training reward", best],
        ["first held-out" + fh, _metrics(s["first_heldout"])], ["last held-out" + lh, _metrics(s["last_heldout"])],
        ["best held-out", best_held],
        ["median step time", _num(s["median_step_s"], "{:.2f} s")],
        ["QES overhead (perturb + restore + update) / eval",
         "—" if s["qes_overhead"] is None else f"{s['qes_overhead']:.1%}"],
        ["peak RSS / inference RSS", peak],
        ["steps without signal (all coefficients 0)", _quiet(s)],
    ]
    # several --reward: a column each, its mean over the step's members (reward_parts)
    part_names = list(dict.fromkeys(n for ev in record.events() if ev["event"] == "step"
                                    for n in (ev["timings"].get("reward_parts") or {})))
    step_header = ["step", "reward", *part_names, "min", "max", "failed", "q16 min", "q16 max",
                   *[PHASE_LABELS[k] for k in PHASES], "total s", "changed", "RSS MB"]
    numeric = set(range(len(step_header)))
    rows = []

    def parts_of(ev) -> list[str]:
        means = part_means(ev["timings"])
        return [_num(means[n]) if means.get(n) is not None else "—" for n in part_names]
    for ev in record.events():
        if ev["event"] == "eval":
            rows.append(eval_text(ev))
            continue
        t = step_seconds(ev)
        rows.append([ev["step"], _num(ev["reward"]), *parts_of(ev), _num(ev["min_reward"]), _num(ev["max_reward"]),
                     ev["failures"],
                     ev["coef_q16_min"], ev["coef_q16_max"], *[_num(_t(ev, k), "{:.2f}") for k in PHASES],
                     _num(t, "{:.2f}"), fmt_value(ev["timings"].get("changed")), _num(_t(ev, "rss_mb"), "{:.1f}")])
    step_table = _table(rows, step_header, numeric)
    img = base64.b64encode(png).decode("ascii")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>{_e(f"qes-edge report: run {run.run_id[:8]} ({run.base_name}, {cfg.get('task')})")}</title>
<style>{CSS}</style></head>
<body>
<h1>qes-edge run {_e(run.run_id[:8])}</h1>
<p class="muted">{_e(run.base_name)} · task {_e(cfg.get('task'))} · {_e(record.n_steps)} steps, chain and head verified</p>
<div class="cols">
<div>{_table(head_rows)}</div>
<div><details open><summary>recorded config ({len(cfg_rows)} keys)</summary>
{_table(cfg_rows, ["key", "value"])}
</details></div>
</div>
<h2>Figure</h2>
<img alt="{_e('reward per step with held-out metrics; step time by phase; peak memory against inference')}"
     src="data:image/png;base64,{img}">
<h2>Summary</h2>
{_table(sum_rows)}
<h2>Steps</h2>
{step_table}
<p class="muted">Written by qes-edge report from {_e(record.path)} on {_e(time.strftime("%Y-%m-%d %H:%M:%S"))}.</p>
</body></html>
"""


def write_report(record: RunRecord, out: Path, png_path: Path) -> dict:
    """Render both, then write each atomically (the PNG first); returns the summary numbers."""
    from qes_edge.atomic import atomic_output
    png = figure_png(record)
    s = summary(record)
    text = page(record, s, png)
    with atomic_output(png_path, "wb") as (_tmp, f):
        f.write(png)
    with atomic_output(out, "w") as (_tmp, f):
        f.write(text)
    return s
