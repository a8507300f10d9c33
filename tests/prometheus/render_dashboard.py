"""Draw deploy/grafana/dicom-gateway.json's panels from a real Prometheus into one PNG.

Grafana's server cannot be installed on our machines, so this stands in for a screenshot:
the same panels, titles, queries, legends and units, drawn with matplotlib from
query_range answers. Called by check.py --render (see tests/prometheus/run.sh).
"""

import math

UNIT_SCALE = {
    "bytes": (1 / 2**30, "GiB"),
    "MBs": (1, "MB/s"),
    "ops": (1, "/s"),
    "s": (1, "s"),
    "d": (1, "days"),
    "short": (1, ""),
}


def legend(fmt, metric):
    out = fmt
    for k, v in metric.items():
        out = out.replace("{{" + k + "}}", v)
    return out


def render(dash, prom, start, end, path, substitute):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    from datetime import datetime, timezone

    panels = [p for p in dash["panels"] if p["type"] != "row"]
    cols = 4
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 4.2, rows * 2.6), dpi=72)
    fig.patch.set_facecolor("#111217")
    step = max(1, int((end - start) / 150))
    for ax, p in zip(axes.flat, panels):
        ax.set_facecolor("#181b1f")
        for s in ax.spines.values():
            s.set_color("#333")
        ax.tick_params(colors="#ccc", labelsize=6)
        ax.set_title(p["title"], color="#ddd", fontsize=7.5, loc="left")
        scale, unit = UNIT_SCALE.get(p["fieldConfig"]["defaults"].get("unit", "short"), (1, ""))
        drawn = 0
        bars = []
        for t in p["targets"]:
            for series in prom.query_range(substitute(t["expr"]), start, end, step):
                pts = [(float(x), float(v)) for x, v in series["values"] if v not in ("NaN", "+Inf", "-Inf")]
                if not pts:
                    continue
                name = legend(t.get("legendFormat", ""), series["metric"])
                if p["type"] == "bargauge":
                    bars.append((name, pts[-1][1] * scale))
                    continue
                xs = [datetime.fromtimestamp(x, timezone.utc) for x, _ in pts]
                ax.plot(xs, [v * scale for _, v in pts], linewidth=1, label=name)
                drawn += 1
        if p["type"] == "bargauge" and bars:
            names = [b[0] for b in bars]
            vals = [b[1] for b in bars]
            colors = ["#d44a3a" if v < 14 else "#73bf69" for v in vals]
            ax.barh(names, [min(v, 400) for v in vals], color=colors)
            for i, v in enumerate(vals):
                ax.text(min(v, 400), i, f" {v:.0f}", va="center", color="#ddd", fontsize=6)
            ax.set_xlabel("days (capped at 400)", color="#aaa", fontsize=6)
        elif drawn:
            ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
            ax.legend(fontsize=5, loc="upper left", facecolor="#181b1f", labelcolor="#ccc", edgecolor="#333")
            if unit:
                ax.set_ylabel(unit, color="#aaa", fontsize=6)
        else:
            ax.text(0.5, 0.5, "no data", color="#888", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(
        "dicom-gateway dashboard, drawn from a real Prometheus (tests/prometheus/run.sh): "
        "site A -> site B -> storescp, then site B stopped",
        color="#eee",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, facecolor=fig.get_facecolor())
    plt.close(fig)
