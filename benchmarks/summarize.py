"""Print a markdown table of benchmark result JSON files (benchmarks/results/*.json)."""

import json
import sys


def main(paths):
    for path in paths:
        data = json.load(open(path))
        env = data["environment"]
        print(f"\n### {data['suite']} on {env['device']} (torch {env['torch']}, triton {env['triton']}, "
              f"commit {env['git_commit']}, {env['date']})")
        if data.get("ceilings"):
            print("ceilings: " + ", ".join(f"{k} {v:.1f}" for k, v in data["ceilings"].items()))
        rows = data["rows"]
        keys = [k for k in rows[0] if k != "device_type"]
        print("| " + " | ".join(keys) + " |")
        print("|" + "---|" * len(keys))
        for row in rows:
            cells = [f"{row[k]:.3g}" if isinstance(row.get(k), float) else str(row.get(k)) for k in keys]
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
