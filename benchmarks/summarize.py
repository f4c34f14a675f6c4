"""Print markdown tables of benchmark results: the session-end JSON files
(benchmarks/results/*.json) and/or the JSON-lines row files that
``REXFAST_BENCH_ROWS`` makes (run_device.sh's rows.jsonl: one ``{"suite", "environment"}``
line per suite and process, then one ``{"suite", "row"}`` line per row)."""

import json
import re
import sys
from collections import defaultdict

SPREAD = re.compile(r"_(q1|q3|min|max)_ms$|_rounds$")


def _load_jsonl(path):
    """[(suite, environment, ceilings, rows)] from a rows file, one entry per suite."""
    env, rows, order = {}, defaultdict(list), []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill: say so, keep the rest
                print(f"({path}:{n}: an incomplete line, skipped)")
                continue
            suite = item["suite"]
            if suite not in order:
                order.append(suite)
            if "environment" in item:
                env.setdefault(suite, item["environment"])
            if "row" in item:
                rows[suite].append(item["row"])
    return [(s, env.get(s), None, rows[s]) for s in order if rows[s]]


def _load(path):
    if path.endswith(".jsonl"):
        return _load_jsonl(path)
    data = json.load(open(path))
    return [(data["suite"], data["environment"], data.get("ceilings"), data["rows"])]


def table(suite, env, ceilings, rows, brief=False):
    if env:
        print(f"\n### {suite} on {env['device']} (torch {env['torch']}, triton {env['triton']}, "
              f"commit {env['git_commit']}, {env['date']})")
    else:
        print(f"\n### {suite}")
    if ceilings:
        print("ceilings: " + ", ".join(f"{k} {v:.1f}" for k, v in ceilings.items()))
    keys = []
    for row in rows:  # rows of one suite may differ in their fields (a compile row has more)
        keys += [k for k in row if k != "device_type" and k not in keys and not (brief and SPREAD.search(k))]
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        cells = [f"{row[k]:.3g}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in keys]
        print("| " + " | ".join(cells) + " |")


def main(args):
    """``summarize.py [--brief] FILE...``; --brief leaves out the spread columns (min, max, quartiles, rounds)."""
    brief = "--brief" in args
    found = False
    for path in (a for a in args if a != "--brief"):
        for entry in _load(path):
            table(*entry, brief=brief)
            found = True
    if not found:
        print("no benchmark rows")


if __name__ == "__main__":
    main(sys.argv[1:])
