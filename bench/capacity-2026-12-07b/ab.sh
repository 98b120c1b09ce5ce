#!/usr/bin/env bash
# Interleaved A/B of two trees under the same (shared) load: BASE (a checkout of the commit before the change, with
# its own venv: `git archive COMMIT | tar -x -C $BASE && bash /work/wt/mkvenv.sh $BASE`) against this tree, N
# streams, R rounds of `avloc bench pipeline` each (8 s measured after 3 s warm-up, no baseline). Compare CPU-ms per
# served heatmap and per source frame (summary.py), not heatmaps/s, which the load moves from run to run.
#   BASE=/tmp/ovl_base N=4 R=3 TAG=audio4 bash bench/capacity-2026-12-07b/ab.sh
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
NEW=$(cd "$HERE/../.." && pwd)
BASE=${BASE:?checkout of the commit to compare against}
N=${N:-4}; R=${R:-2}; TAG=${TAG:-ab}
ENGINE=${ENGINE:-/work/data/flow_engine}
CLIP=${CLIP:-/work/data/flow_stamps/video/clip_0000.mp4}
OUT=${OUT:-/tmp/avloc_ab/$TAG}; mkdir -p "$OUT"
for r in $(seq 1 "$R"); do
  for side in base new; do
    if [ $side = base ]; then D=$BASE; else D=$NEW; fi
    (cd "$D" && .venv/bin/python -m avloc bench pipeline --video "$CLIP" --engine "$ENGINE" --streams "$N" \
      --duration 8 --warmup 3 --no-baseline --out "$OUT/${side}_r$r.json" > "$OUT/${side}_r$r.log" 2>&1)
    echo "$side r$r exit $? load $(cut -d' ' -f1-3 /proc/loadavg)"
  done
done
"$NEW/.venv/bin/python" "$HERE/summary.py" "$OUT"
