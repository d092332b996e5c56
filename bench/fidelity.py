#!/usr/bin/env python3
"""What-if fidelity (bench/RESULTS.md "What-if fidelity"): the real-time goodput runs against
`whatif` on the same workload, seed, rate and 8 replicas.

The real side is the first rung of each `scenario goodput` run (fresh processes, 20 s of warm-up at
the rung's rate, then 60 s measured), read from the run directory's `loadgen.json`; the what-if side
replays the same workload preset at the same rate with the same warm-up and window in virtual time.
Prints a Markdown table and writes the numbers as JSON (the fixture of whatif/tests/fidelity.rs).

    python3 bench/fidelity.py [--run-dir .run/bench] [--whatif target/release/whatif] \
        [--json bench/results/fidelity.json]

Standard library only.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

# The goodput presets (bench/src/bin/scenario.rs `goodput_preset`), as whatif arguments.
WORKLOADS = {
    "shared-prefix": ["--workload", "shared-prefix", "--groups", "32", "--system-tokens", "16000",
                      "--question-tokens", "3000"],
    "multi-turn": ["--workload", "multi-turn", "--user-system-tokens", "8000", "--turn-tokens",
                   "1000", "--reply-tokens", "1000"],
    "hot-spot": ["--workload", "hot-spot", "--groups", "64", "--system-tokens", "8000",
                 "--question-tokens", "3000"],
    "cache-pressure": ["--workload", "cache-pressure", "--groups", "224", "--system-tokens", "8000",
                       "--question-tokens", "400", "--kv-blocks", "8192"],
    "mixed": ["--workload", "mixed", "--prompt-median", "3000"],
}
# Router run directory suffix → whatif config.
CONFIGS = {"switchyard-default": "balanced", "switchyard-cost": "cost-model"}
WARMUP_S = 20.0
STEP_S = 60.0


def quantile(sorted_values, q):
    """Linear interpolation between closest ranks (numpy's default)."""
    if not sorted_values:
        return None
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def real_point(loadgen_path):
    report = json.loads(loadgen_path.read_text())
    rate = report["spec"]["mode"]["rate"]
    recs = [r for r in report["records"] if WARMUP_S <= r["sent_s"] < WARMUP_S + STEP_S]
    ok = [r for r in recs if r["status"] == 200 and r.get("ttft_ms") is not None]
    ttft = sorted(r["ttft_ms"] for r in ok)
    prompt = sum(r.get("prompt_tokens") or 0 for r in ok)
    cached = sum(r.get("cached_tokens") or 0 for r in ok)
    return {
        "rate": rate,
        "requests": len(recs),
        "errors": len(recs) - len(ok),
        "ttft_p50_ms": quantile(ttft, 0.5),
        "ttft_p90_ms": quantile(ttft, 0.9),
        "hit_rate": cached / prompt if prompt else 0.0,
    }


def whatif_point(whatif, workload, config, rate):
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [whatif, "--config", config, *WORKLOADS[workload], "--rates", f"{rate:g}",
               "--duration", f"{WARMUP_S + STEP_S:g}", "--warmup", f"{WARMUP_S:g}",
               "--json", out.name]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        summary = json.loads(Path(out.name).read_text())["summaries"][0]
    return {
        "rate": rate,
        "requests": summary["requests"],
        "errors": summary["errors"],
        "ttft_p50_ms": summary["ttft_ms"]["p50"],
        "ttft_p90_ms": summary["ttft_ms"]["p90"],
        "hit_rate": summary["hit_rate"],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", default=".run/bench")
    ap.add_argument("--whatif", default="target/release/whatif")
    ap.add_argument("--json", default=None, help="write the points here")
    args = ap.parse_args()
    rows = []
    for workload in WORKLOADS:
        for router, config in CONFIGS.items():
            path = Path(args.run_dir) / f"goodput-{workload}-{router}" / "loadgen.json"
            if not path.exists():
                print(f"missing {path}", file=sys.stderr)
                continue
            real = real_point(path)
            what = whatif_point(args.whatif, workload, config, real["rate"])
            rows.append({"workload": workload, "config": config, "real": real, "whatif": what})

    def rel(a, b):
        return f"{(b - a) / a * 100:+.0f}%" if a else "–"

    print("| workload | config | rate | TTFT p50 real / what-if | Δ | TTFT p90 real / what-if | Δ "
          "| hit rate real / what-if | Δ (points) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        r, w = row["real"], row["whatif"]
        print(f"| `{row['workload']}` | `{row['config']}` | {r['rate']:g} "
              f"| {r['ttft_p50_ms']:.0f} / {w['ttft_p50_ms']:.0f} | {rel(r['ttft_p50_ms'], w['ttft_p50_ms'])} "
              f"| {r['ttft_p90_ms']:.0f} / {w['ttft_p90_ms']:.0f} | {rel(r['ttft_p90_ms'], w['ttft_p90_ms'])} "
              f"| {r['hit_rate'] * 100:.1f}% / {w['hit_rate'] * 100:.1f}% "
              f"| {(w['hit_rate'] - r['hit_rate']) * 100:+.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"warmup_s": WARMUP_S, "step_s": STEP_S,
                                               "workloads": WORKLOADS, "points": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
