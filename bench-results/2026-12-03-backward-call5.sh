#!/usr/bin/env bash
# 2026-12-03 backward, final device call: tests, bench with per-kernel profile, knob ablations, peer.
D=.devrun-backward
S="--shape 4,16,4096,64 --shape 4,16,4096,128 --causal yes --dtype f16 --path auto"
L=$OUT/call5.txt
{
echo "== backward tests, default knobs"
timeout 100 $D/backward --test-threads 1 2>&1 | grep -E "^test |result"
echo "== coop_backward with every new knob off (SPLIT SGBAR COOP_COLSUM KEEP PREFETCH = 0)"
SELATTN_BACKWARD_SPLIT=0 SELATTN_BACKWARD_SGBAR=0 SELATTN_BACKWARD_COOP_COLSUM=0 SELATTN_BACKWARD_KEEP=0 SELATTN_BACKWARD_PREFETCH=0 timeout 60 $D/backward --test-threads 1 coop_backward 2>&1 | grep -E "^test |result"
echo "== bench, default knobs"
timeout 90 $D/bench --backward --profile $S --variant plain --variant full --warmup 1 --iters 10 --budget 1.5 --json $OUT/ours.json 2>&1 | tail -9
for k in PREFETCH SGBAR KEEP ALL; do
  echo "== bench full, SELATTN_BACKWARD_$k=0"
  if [ $k = ALL ]; then E="SELATTN_BACKWARD_SPLIT=0 SELATTN_BACKWARD_SGBAR=0 SELATTN_BACKWARD_COOP_COLSUM=0 SELATTN_BACKWARD_KEEP=0 SELATTN_BACKWARD_PREFETCH=0"; else E="SELATTN_BACKWARD_$k=0"; fi
  env $E timeout 40 $D/bench --backward --profile $S --variant full --warmup 1 --iters 3 --budget 0.5 --no-check 2>&1 | tail -4
done
echo "== peer"
timeout 150 python3 $D/peer.py 20 --backward --shape 4,16,4096,64 --shape 4,16,4096,128 --json $OUT/peer.json 2>&1 | tail -8
} > $L 2>&1
cat $L
