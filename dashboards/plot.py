#!/usr/bin/env python3
"""Plots the dashboards' time series panels from a Prometheus to PNGs,
for reports where no Grafana runs: one PNG per panel, named
<dashboard>-<panel>.png.

    dashboards/plot.py http://127.0.0.1:9090 OUT_DIR [--minutes 10] [--step 2]

Needs matplotlib (e.g. in a scratch venv: python3 -m venv /tmp/plot &&
/tmp/plot/bin/pip install matplotlib). Variables are filled as the e2e test
fills them (tests/src/dashboards.rs): All hosts, $__rate_interval =
max(step + 1 s, 4 s) for a 1 s scrape interval.
"""

import argparse
import json
import re
import time
import urllib.parse
import urllib.request
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent


def substitute(expr, variables):
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", variables[name]).replace("$" + name, variables[name])
    return expr


def query_range(url, expr, start, end, step):
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": f"{step}s"})
    with urllib.request.urlopen(f"{url}/api/v1/query_range?{params}", timeout=30) as answer:
        body = json.load(answer)
    if body["status"] != "success":
        raise RuntimeError(f"{expr}: {body}")
    return body["data"]["result"]


def legend(fmt, labels, expr):
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt).strip()
    return text or ", ".join(f"{k}={v}" for k, v in labels.items()) or expr[:40]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("prometheus")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--step", type=int, default=2)
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    end = time.time()
    start = end - args.minutes * 60
    variables = {
        "__rate_interval": f"{max(args.step + 1, 4)}s",
        "__interval": f"{args.step}s",
        "__range": f"{int(args.minutes * 60)}s",
        "host": ".*",
    }
    for path in sorted(HERE.glob("*.json")):
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            if panel["type"] != "timeseries":
                continue
            fig, ax = plt.subplots(figsize=(8, 3.5))
            for target in panel["targets"]:
                expr = substitute(target["expr"], variables)
                for series in query_range(args.prometheus, expr, start, end, args.step):
                    points = [(float(t), float(v)) for t, v in series["values"]]
                    times, values = [t - end for t, _ in points], [v for _, v in points]
                    if all(v == 0 for v in values):
                        # Counters registered at zero: drawn, not listed.
                        ax.plot(times, values, color="lightgrey", linewidth=0.8)
                    else:
                        ax.plot(times, values, label=legend(target.get("legendFormat", ""), series["metric"], expr))
            ax.set_title(f"{dashboard['title']}: {panel['title']}")
            ax.set_xlabel("seconds before now")
            unit = panel["fieldConfig"]["defaults"].get("unit", "none")
            if unit != "none":
                ax.set_ylabel(unit)
            if any(not line.get_label().startswith("_") for line in ax.lines):
                ax.legend(fontsize="small", loc="upper left")
            name = re.sub(r"[^a-z0-9]+", "-", f"{path.stem} {panel['title']}".lower()).strip("-")
            fig.tight_layout()
            fig.savefig(args.out_dir / f"{name}.png", dpi=100)
            plt.close(fig)
            print(args.out_dir / f"{name}.png")


if __name__ == "__main__":
    main()
