#!/usr/bin/env python3
"""Writes the Grafana dashboards in this folder from the compact description
below, so every panel has the same data source, layout and target shape.

    dashboards/generate.py           rewrite the *.json files
    dashboards/generate.py --check   fail if a committed file differs

Queries use Grafana's variables: ${datasource}, $host (All = .*),
$__rate_interval and $__range. The e2e test (tests/tests/dashboards.rs)
runs every expression against a real Prometheus scraping a real stack.
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
HOST_QUERY = "label_values(opencloud_control_host_up, host)"


def stat(title, *targets, unit="none", description=""):
    return {"type": "stat", "title": title, "targets": targets, "unit": unit, "description": description}


def series(title, *targets, unit="none", description=""):
    return {"type": "timeseries", "title": title, "targets": targets, "unit": unit, "description": description}


def row(title):
    return {"type": "row", "title": title}


def q(expr, legend=""):
    return (expr, legend)


def quantiles(metric, by="", legend_prefix=""):
    """p50, p95 and p99 of histogram `metric` (its _bucket series)."""
    group = f"le, {by}" if by else "le"
    return [
        q(
            f"histogram_quantile({p}, sum by ({group}) (rate({metric}_bucket[$__rate_interval])))",
            f"{legend_prefix}p{int(p * 100)}" + (f" {{{{{by}}}}}" if by else ""),
        )
        for p in (0.5, 0.95, 0.99)
    ]


# Gauges control reads from the database at scrape time are the same on
# every control replica: they are taken with max, never summed.
REQUESTS = "opencloud_gateway_requests_total"
# No 5xx series yet means no 5xx answer yet: zero errors, not no data.
ERROR_RATIO = (
    f'(sum(rate({REQUESTS}{{status=~"5.."}}[$__rate_interval])) or vector(0))'
    f" / sum(rate({REQUESTS}[$__rate_interval]))"
)

DASHBOARDS = [
    {
        "file": "overview.json",
        "uid": "opencloud-overview",
        "title": "OpenCloud overview",
        "host_variable": False,
        "panels": [
            stat("Users online", q("max(opencloud_control_users_online)"),
                 description="Distinct users with a live session or a request in the last 5 minutes."),
            stat("Sessions running", q('max(opencloud_control_sessions{state="running"})')),
            stat("Sessions starting", q('max(opencloud_control_sessions{state="starting"})')),
            stat("Hosts online", q("sum(max by (host) (opencloud_control_host_up))"),
                 description="Registered, unrevoked hosts with a fresh heartbeat."),
            stat("Error ratio seen by users", q(ERROR_RATIO), unit="percentunit",
                 description="Gateway answers 5xx over all answers."),
            stat("Revenue today (minor units)", q("max by (currency) (opencloud_control_revenue_today_minor)", "{{currency}}"),
                 description="Purchases paid since 00:00 UTC minus refunds, in cents (or the currency's minor unit)."),
            series("Open to ready", *quantiles("opencloud_control_session_open_to_ready_seconds", by="start"), unit="s",
                   description="From Open (or from leaving the queue) to the notebook answering; warm: bound to a server of a host's warm pool, cold: a server started for it."),
            stat("Opens waiting", q("max(opencloud_control_queue_length)"),
                 description="Opens in the queue because every host is full."),
            series("Queue", q("max(opencloud_control_queue_length)", "waiting"),
                   q("max(opencloud_control_queue_oldest_wait_seconds)", "oldest wait (s)"),
                   description="Opens waiting for room, and how long the first has waited."),
            series("Leaving the queue",
                   q("sum by (outcome) (rate(opencloud_control_queue_exits_total[$__rate_interval]))", "{{outcome}}"),
                   unit="ops", description="placed, cancelled by the user, abandoned (nobody waiting), or dropped."),
            series("Starts moved to another host",
                   q("sum by (outcome) (rate(opencloud_control_placement_retries_total[$__rate_interval]))", "{{outcome}}"),
                   unit="ops", description="A host refused or failed a start: replaced on another host, or no other host / too many tries."),
            series("Sessions", q("max by (state) (opencloud_control_sessions)", "{{state}}")),
            series("Error ratio seen by users", q(ERROR_RATIO, "5xx / all"), unit="percentunit"),
            series("Users online", q("max(opencloud_control_users_online)", "users")),
        ],
    },
    {
        "file": "gateway.json",
        "uid": "opencloud-gateway",
        "title": "OpenCloud gateway",
        "host_variable": False,
        "panels": [
            stat("Open WebSockets", q("sum(opencloud_gateway_active_websockets)")),
            stat("Route table version", q("max(opencloud_gateway_route_table_version)")),
            stat("Route table age", q("max(opencloud_gateway_route_table_age_seconds)"), unit="s",
                 description="Seconds since the last route update; control sends one at least every 5 s."),
            stat("Error ratio", q(ERROR_RATIO), unit="percentunit"),
            series("Requests by class and status",
                   q(f"sum by (class, status) (rate({REQUESTS}[$__rate_interval]))", "{{class}} {{status}}"), unit="reqps"),
            series("Latency", *quantiles("opencloud_gateway_request_duration_seconds", by="class"), unit="s"),
            series("Open WebSockets", q("sum by (instance) (opencloud_gateway_active_websockets)", "{{instance}}")),
            series("Route table age", q("opencloud_gateway_route_table_age_seconds", "{{instance}}"), unit="s"),
            series("Token refusals by reason",
                   q("sum by (kind, reason) (rate(opencloud_gateway_token_rejections_total[$__rate_interval]))",
                     "gateway {{kind}} {{reason}}"),
                   q("sum by (reason) (rate(opencloud_control_token_rejections_total[$__rate_interval]))",
                     "control {{reason}}"),
                   unit="reqps"),
            series("Upstream connect errors by host",
                   q("sum by (host, class) (rate(opencloud_gateway_upstream_connect_errors_total[$__rate_interval]))"
                     " or vector(0)", "host {{host}} {{class}}"),
                   unit="reqps",
                   description="The gateway could not reach a host's link (series appear with the first error)."),
        ],
    },
    {
        "file": "hosts.json",
        "uid": "opencloud-hosts",
        "title": "OpenCloud hosts",
        "host_variable": True,
        "panels": [
            series("CPU", q('max by (host) (opencloud_control_host_cpu_ratio{host=~"$host"})', "host {{host}}"), unit="percentunit"),
            series("Memory used", q('max by (host) (opencloud_control_host_memory_used_ratio{host=~"$host"})', "host {{host}}"),
                   unit="percentunit"),
            series("Sessions", q('max by (host) (opencloud_control_host_sessions{host=~"$host"})', "host {{host}}")),
            series("Warm servers", q('max by (host) (opencloud_control_host_warm_servers{host=~"$host"})', "host {{host}}"),
                   description="Jupyter servers started ahead and ready to be bound to the next open (warm_pool in the agent's config)."),
            series("Reachable from the gateway", q('opencloud_gateway_host_reachable{host=~"$host"}', "host {{host}}"),
                   description="1 when the gateway's own health probe reaches the host's link."),
            series("Heartbeat age", q('max by (host) (opencloud_control_host_heartbeat_age_seconds{host=~"$host"})', "host {{host}}"),
                   unit="s"),
            stat("Uptime over 30 days", q('max by (host) (opencloud_control_host_uptime_ratio_30d{host=~"$host"})', "host {{host}}"),
                 unit="percentunit"),
            series("Spawn time (p95)",
                   q("histogram_quantile(0.95, sum by (le) (rate(opencloud_control_session_spawn_seconds_bucket[$__rate_interval])))",
                     "control"),
                   q("histogram_quantile(0.95, sum by (le, instance) (rate(opencloud_agent_spawn_seconds_bucket[$__rate_interval])))",
                     "agent {{instance}}"),
                   unit="s"),
            series("Starts waiting at the gate",
                   q("max by (instance) (opencloud_agent_starts_waiting)", "agent {{instance}}"),
                   description="Users' cold starts waiting their turn at the host's start gate "
                               "(start_concurrency at once, first come first served)."),
            series("Warm binds",
                   q("sum by (instance) (increase(opencloud_agent_warm_binds_total[$__rate_interval]))",
                     "bound, agent {{instance}}"),
                   q("sum by (instance) (increase(opencloud_agent_warm_bind_failures_total[$__rate_interval]))",
                     "fell back to cold, agent {{instance}}"),
                   description="Opens that took a warm server, and those whose warm server failed them (they started cold)."),
            series("Snapshot failures",
                   # Control's series carry the host and appear with the first failure.
                   q('sum by (host, direction, reason) (increase(opencloud_control_snapshot_failures_total{host=~"$host"}[$__rate_interval]))'
                     " or vector(0)", "control host {{host}} {{direction}} {{reason}}"),
                   q("sum by (instance, op) (increase(opencloud_agent_snapshot_failures_total[$__rate_interval]))",
                     "agent {{instance}} {{op}}")),
        ],
    },
    {
        "file": "business.json",
        "uid": "opencloud-business",
        "title": "OpenCloud business",
        "host_variable": False,
        "panels": [
            stat("Revenue today (minor units)", q("max by (currency) (opencloud_control_revenue_today_minor)", "{{currency}}")),
            stat("Host earnings owed (minor units)",
                 q("max by (currency) (opencloud_control_host_earnings_owed_minor)", "{{currency}}")),
            stat("Compute time outstanding", q("max(opencloud_control_compute_seconds_outstanding)"), unit="s",
                 description="Unexpired, unused seconds on all lots."),
            stat("Ledger drift (lots)", q("max(opencloud_control_ledger_drift_lots)"),
                 description="Lots whose balance is not the sum of their entries; anything but 0 is a bug."),
            series("Payments by outcome",
                   q("sum by (provider, outcome) (increase(opencloud_control_payments_total[$__rate_interval]))",
                     "{{provider}} {{outcome}}")),
            series("Revenue",
                   q("sum by (currency) (increase(opencloud_control_revenue_minor_total[$__rate_interval]))",
                     "{{currency}}")),
            series("Compute time by kind",
                   q("sum by (kind) (increase(opencloud_control_compute_seconds_total[$__rate_interval]))", "{{kind}}"),
                   unit="s", description="Seconds sold, granted, used, expired, refunded and revoked."),
            series("Host earnings owed", q("max by (currency) (opencloud_control_host_earnings_owed_minor)", "{{currency}}")),
            series("Webhook rejections",
                   q("sum by (provider, reason) (increase(opencloud_control_webhook_rejections_total[$__rate_interval]))",
                     "{{provider}} {{reason}}")),
        ],
    },
]

WIDTH = {"stat": 4, "timeseries": 12}
HEIGHT = {"stat": 4, "timeseries": 8}


def layout(panels):
    """Grafana panels left to right, wrapping at 24 columns, ids from 1."""
    out, x, y, line_height = [], 0, 0, 0
    for number, panel in enumerate(panels, start=1):
        width, height = WIDTH[panel["type"]], HEIGHT[panel["type"]]
        if x + width > 24:
            x, y, line_height = 0, y + line_height, 0
        out.append(render(panel, number, {"h": height, "w": width, "x": x, "y": y}))
        x += width
        line_height = max(line_height, height)
    return out


def render(panel, number, grid):
    refs = "ABCDEFGH"
    return {
        "id": number,
        "type": panel["type"],
        "title": panel["title"],
        "description": panel["description"],
        "datasource": DATASOURCE,
        "gridPos": grid,
        "fieldConfig": {"defaults": {"unit": panel["unit"]}, "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"]}} if panel["type"] == "stat" else {
            "legend": {"displayMode": "list", "placement": "bottom"}},
        "targets": [
            {"refId": refs[i], "datasource": DATASOURCE, "expr": expr, "legendFormat": legend,
             "instant": panel["type"] == "stat", "range": panel["type"] != "stat"}
            for i, (expr, legend) in enumerate(panel["targets"])
        ],
    }


def variables(host):
    found = [{
        "name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
        "current": {}, "hide": 0, "refresh": 1, "options": [],
    }]
    if host:
        found.append({
            "name": "host", "label": "Host", "type": "query", "datasource": DATASOURCE,
            "definition": HOST_QUERY, "query": {"query": HOST_QUERY, "refId": "host"},
            "includeAll": True, "multi": True, "allValue": ".*", "current": {}, "hide": 0,
            "refresh": 2, "sort": 3, "options": [],
        })
    return found


def dashboard(spec):
    return {
        "uid": spec["uid"],
        "title": spec["title"],
        "tags": ["opencloud"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "timezone": "utc",
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": variables(spec["host_variable"])},
        "annotations": {"list": []},
        "links": [{"type": "dashboards", "tags": ["opencloud"], "asDropdown": True, "title": "OpenCloud"}],
        "panels": layout(spec["panels"]),
    }


def main():
    check = sys.argv[1:] == ["--check"]
    stale = []
    for spec in DASHBOARDS:
        text = json.dumps(dashboard(spec), indent=2) + "\n"
        path = HERE / spec["file"]
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(spec["file"])
        else:
            path.write_text(text)
    if stale:
        sys.exit(f"dashboards differ from dashboards/generate.py: {', '.join(stale)} (run dashboards/generate.py)")


if __name__ == "__main__":
    main()
