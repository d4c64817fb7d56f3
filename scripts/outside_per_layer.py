"""Item 6 of issue 12 per MoE layer, read back from a bench_offload log written before the benchmark gave it
(`outside_work_share_per_layer`, from the twenty-first session on): for each R1-share row, the median spacing of MoE
layers less a layer's share of the experts' paths and its own device reads at the HBM ceiling, over the spacing.

The logs keep per step only the medians of the host CPU's and the link's sums, so a layer's paths are taken as the
larger of the two over the layers: at most the benchmark's per-layer sum of the slower path, and the share printed
is at least the benchmark's (an upper bound).

    python3 scripts/outside_per_layer.py benchmarks/offload_run44.log [--hbm-gbps 2397] [--layers 5]
"""

import argparse
import json
import re
import statistics

from bench_offload import layer_own_bytes, outside_share_per_layer

UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("log")
    p.add_argument("--hbm-gbps", type=float, default=2397.0, help="the HBM ceiling the run was given")
    p.add_argument("--layers", type=int, default=5, help="decoder layers of the run's model (1 dense + MoE)")
    args = p.parse_args()
    core, rows, expert_bytes = {}, {}, None
    for line in open(args.log):
        m = re.match(r"(\w+)\s+device\s+([\d.]+) (B|KiB|MiB|GiB)\s*$", line)
        if m:  # the placement table: a group's bytes on the device
            core[m[1]] = float(m[2]) * UNITS[m[3]]
        elif line.startswith("ROW "):
            name, row = line[4:].split(" ", 1)
            rows[name] = json.loads(row)
        elif line.startswith("RESULT "):
            expert_bytes = json.loads(line[7:])["expert_bytes"]
    for name, r in rows.items():
        if "r1_extrapolated_s" not in r or not r["layer_spacing_ms"]:
            continue
        n_moe = len(r["layer_spacing_ms"]) + 1
        # The logs keep no step's cache reads: none counted (they are ~1 MiB a step at these contexts).
        own = layer_own_bytes(core, 0, args.layers, n_moe, r["experts_per_step"]["device"], expert_bytes)
        spacing = statistics.median(r["layer_spacing_ms"]) / 1e3
        paths = max(r["host_cpu_s_per_step"], r["link_s_per_step"]) / n_moe
        share = outside_share_per_layer(spacing, paths, own, args.hbm_gbps)
        print(f"{name}: spacing {spacing * 1e3:.3f} ms, a layer's paths >= {paths * 1e3:.2f} ms, its own reads "
              f"{own / (args.hbm_gbps * 1e9) * 1e3:.3f} ms: outside at most {100 * share:.0f}%")


if __name__ == "__main__":
    main()
