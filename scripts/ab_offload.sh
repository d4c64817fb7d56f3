#!/usr/bin/env bash
# The offload benchmark's int4 part (AB_PART=int8: its int8 part) on this tree and on an earlier commit, one
# process each, in turn: an A/B of a change to the decode path on the GPU machine, which has no git history to check
# a commit out from.
#
#   scripts/ab_offload.sh prepare COMMIT   # here: COMMIT's ktjax/ and scripts/ into ab_base/ (untracked, so
#                                          # the device tool carries it; delete it afterwards)
#   OUT=... scripts/ab_offload.sh run [VARIANTS_NEW [VARIANTS_BASE]]   # on the device, after the editable install
#                                          # (VARIANTS_BASE '-': this tree only, its variants against each other)
#
# AB_FORMS: the decode forms (bench_offload's --decode-forms, default auto: handoff on a GPU), e.g. "handoff fused";
# the 24 GiB row runs in each, the R1-share rows (and their variants) in the first only.
# AB_MOE_LAYERS: full-size MoE layers (default 4; more show a long launch ahead of the layers, as R1's 58).
# AB_EXTRA: more bench_offload.py options for both trees, e.g. "--trace".
# AB_MEM_FRACTION: the allocator's limit as a share of the GPU's memory (default: the 24 GiB budget's).
# Each process: bench_offload.py --run int4 (the 24 GiB row, then the R1-share row once per --r1-variants value;
# defaults below) with the ceilings of offload.md run 24 passed in, so that no ceilings are measured and
# 'ceiling-rates' splits alike in both trees. Prints each row's step, layer spacing and timeline; logs in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = prepare ]; then
  rm -rf ab_base && mkdir ab_base && git archive "$2" ktjax scripts | tar -x -C ab_base
  echo "ab_base/ holds $2"; exit
fi
[ "${1:-}" = run ] || { sed -n 2,18p "$0"; exit 2; }
ROOT=$(pwd)
TOTAL=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
FRAC=$(python3 -c "print(f'{24 * 1024 / $TOTAL * 1.005:.4f}')")  # the allocator's limit: the 24 GiB budget
FRAC=${AB_MEM_FRACTION:-$FRAC}  # or more, to see whether the allocator's limit holds launches back
R='{"int4-int8-activations_cpu_gbps":60.7,"int4-int8-activations_link_gbps":45.5,"int4-int8-activations_both_cpu_gbps":43.5,"int4-int8-activations_both_link_gbps":36.4}'
PART=${AB_PART:-int4}  # int8: no ceilings passed in (those below are int4's); its rows use the in-situ rates
[ "$PART" = int4 ] || R='{}'
ARGS="--run $PART --moe-layers ${AB_MOE_LAYERS:-4} --gpu-memory 24GiB --batches 1 --modes auto
      --decode-forms ${AB_FORMS:-auto} --steps 30 --prefill-max 0 --host-threads 14 --host-activations int8
      --h2d-gbps 50.8 --hbm-gbps 2397 --matmul-tflops 640 ${AB_EXTRA:-}"
summary() { python3 - "$1" <<'PY'
import collections, json, re, statistics, sys
by_variant = collections.defaultdict(list)
for line in open(sys.argv[1]):
    if line.startswith("ROW "):
        name, row = line[4:].split(" ", 1)
        r = json.loads(row)
        spans = " ".join(f"{k} {v['at']:.2f}-{v['ends']:.2f}" for k, v in r.get("timeline_ms", {}).items())
        r1 = f", R1 {1 / r['r1_extrapolated_s']:.2f} tok/s" if "r1_extrapolated_s" in r else ""
        r1 += f", a layer {100 * r['outside_work_share_per_layer']:.0f}%" if "outside_work_share_per_layer" in r else ""
        r1 += f", first step {r['first_step_s']:.1f} s" if "first_step_s" in r else ""
        r1 += (f", a host call in the step {r['host_call_in_step_ms']:.2f} ms, alone {r['host_call_alone_ms']:.2f}"
               if "host_call_in_step_ms" in r else "")
        r1 += f", tokens as the first row's {100 * r['tokens_as_first_row']:.0f}%" if "tokens_as_first_row" in r else ""
        print(f"  {name}: {r['step_s'] * 1e3:.2f} ms, spacing {r['layer_spacing_ms']}, outside experts "
              f"{100 * r['outside_experts_share']:.0f}% (less the device's reads {100 * r['outside_work_share']:.0f}%)"
              f"{r1}\n    {spans}")
        if "r1_extrapolated_s" in r:  # the R1-share rows by variant, their repeats together
            by_variant[re.sub(r"_again\d+$", "", name)].append((r["step_s"] * 1e3, 1 / r["r1_extrapolated_s"]))
for name, rows in by_variant.items():
    print(f"  median of {name} ({len(rows)} rows): {statistics.median(s for s, _ in rows):.2f} ms, "
          f"R1 {statistics.median(t for _, t in rows):.2f} tok/s")
PY
}
for tree in new base; do
  [ $tree = base ] && [ "${3:-}" = - ] && continue
  if [ $tree = base ]; then dir=$ROOT/ab_base; variants=${3:-plain ceiling-rates plain}; else dir=$ROOT; variants=${2:-plain ceiling-rates plain}; fi
  (cd "$dir/scripts" && env PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$dir" XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB=110 \
     XLA_PYTHON_CLIENT_MEM_FRACTION=$FRAC timeout "${AB_TIMEOUT:-215}" python3 bench_offload.py $ARGS \
     --r1-variants $variants --path-rates "$R" --out "$OUT/ab_$tree" > "$OUT/ab_$tree.log" 2>&1) || true
  echo "== $tree: $(grep -h 'in-situ rates' "$OUT/ab_$tree.log" | cut -c1-140)"
  summary "$OUT/ab_$tree.log"
done
