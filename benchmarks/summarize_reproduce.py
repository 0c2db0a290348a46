"""Merges reproduce.py summaries (several calls, devices, seeds) into one markdown table: mean ± sample
standard deviation over seeds per (data, N, model, objective), with the epochs each run trained and why it
stopped, and the median epoch time per device.

Usage: python benchmarks/summarize_reproduce.py benchmarks/results/reproduce_*/summary.json [--json OUT]
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
from typing import Any

METRICS = ("ndcg@10", "recall@10", "mrr@10")
DATA_NAMES = {"ml1m": "ML-1M", "beauty": "Beauty", "bundled": "bundled"}
MODEL_NAMES = {"blossom": "BlossomRec", "dense": "dense SASRec"}
STOP_NAMES = {"epochs": "capped", "early_stopping": "early stop", "time_budget": "capped by time"}


def load_rows(paths: list[str]) -> list[dict[str, Any]]:
    """Every successful run row of the given summaries, tagged with its summary's device; a run name seen
    twice keeps its last occurrence."""
    rows: dict[str, dict] = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            summary = json.load(f)
        metas = summary.get("calls") or [summary.get("meta", {})]
        device = metas[-1].get("device", "?")
        children = summary.get("meta", {}).get("children")
        if children:
            device = children[0].get("device", device)
        for row in summary["rows"]:
            if row.get("status") == "ok" and row.get("test_uni100"):
                rows[row["name"]] = dict(row, device=row.get("device", device))
    return list(rows.values())


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f}±{statistics.stdev(values):.4f}"


def group(rows: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = collections.defaultdict(list)
    for row in rows:
        groups[(row["data"], row["max_len"], row.get("objective", "prefix"), row["model"])].append(row)
    order = {"ml1m": 0, "beauty": 1, "bundled": 2}
    return dict(sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], 9), -kv[0][1], kv[0][2], kv[0][3])))


def epochs_text(runs: list[dict]) -> str:
    parts = []
    for run in sorted(runs, key=lambda r: r["seed"]):
        stop = STOP_NAMES.get(run.get("stop_reason"), run.get("stop_reason"))
        parts.append(f"{run['epochs_run']} ({stop}, best {run['best_epoch']})")
    return "; ".join(parts)


def table(rows: list[dict]) -> tuple[str, list[dict]]:
    lines = ["| data | N | objective | model | seeds | epochs per seed | uni100 NDCG@10 / Recall@10 / MRR@10 "
             "| full NDCG@10 / Recall@10 / MRR@10 | s/epoch (device) |",
             "|---|---|---|---|---|---|---|---|---|"]
    records = []
    for (data, n, objective, model), runs in group(rows).items():
        seeds = sorted(r["seed"] for r in runs)
        uni = {m: [r["test_uni100"][m] for r in runs] for m in METRICS}
        full = {m: [r["test_full"][m] for r in runs if r.get("test_full")] for m in METRICS}
        by_device = collections.defaultdict(list)
        for r in runs:
            if r.get("median_epoch_s"):
                by_device[r["device"].replace("NVIDIA ", "").replace(" 80GB HBM3", "")].append(r["median_epoch_s"])
        epoch_s = ", ".join(f"{statistics.median(v):.2f} ({d})" for d, v in sorted(by_device.items()))
        seed_text = ", ".join(map(str, seeds)) if len(seeds) < 3 else f"{seeds[0]}–{seeds[-1]}"
        lines.append(f"| {DATA_NAMES.get(data, data)} | {n} | {objective} | {MODEL_NAMES.get(model, model)} | "
                     f"{seed_text} | {epochs_text(runs)} | {' / '.join(_mean_std(uni[m]) for m in METRICS)} | "
                     f"{' / '.join(_mean_std(full[m]) for m in METRICS) if full['ndcg@10'] else '-'} | "
                     f"{epoch_s} |")
        records.append(dict(data=data, max_len=n, objective=objective, model=model, seeds=seeds,
                            uni100={m: statistics.mean(v) for m, v in uni.items()},
                            uni100_std={m: statistics.stdev(v) if len(v) > 1 else None for m, v in uni.items()},
                            full={m: statistics.mean(v) for m, v in full.items() if v},
                            epoch_s=dict((d, statistics.median(v)) for d, v in by_device.items())))
    return "\n".join(lines), records


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("summaries", nargs="+", help="summary.json files of reproduce.py")
    p.add_argument("--json", default=None, help="also write the aggregated records here")
    args = p.parse_args(argv)
    text, records = table(load_rows(args.summaries))
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
