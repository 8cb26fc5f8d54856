#!/usr/bin/env bash
# speed, round 2 (call 4): selective at BC = 64 (selection tile in two column slices, S*rf - F
# written into S). GPU tests (default and SELATTN_COOP_ABLATE=halves), bench new vs main's build
# (bench-base = main 373c62c's kernels) on the default causal f16 shapes, peer in the same call.
D=/tmp/bin; mkdir -p $D
for f in .devrun-speed/*; do case $f in *.sh|*.py) continue;; esac; cp $f $D/; chmod +x $D/$(basename $f); done
gunzip -c .devrun-speed/bench-base.gz > $D/bench-base; chmod +x $D/bench-base; rm -f $D/bench-base.gz
T=$OUT/tests.txt
{
for t in forward f16 selective airtight; do
  echo "== $t"; timeout 100 $D/$t --test-threads 1 2>&1 | grep -E "^test |test result|FAIL|panick" | head -30
done
echo "== f16 + selective, SELATTN_COOP_ABLATE=halves (whole selection tile, BC = 32 at D64)"
SELATTN_COOP_ABLATE=halves timeout 60 $D/f16 --test-threads 1 2>&1 | grep -E "^test |test result"
SELATTN_COOP_ABLATE=halves timeout 60 $D/selective --test-threads 1 2>&1 | grep -E "^test |test result"
} > $T 2>&1
cat $T
B="--variant plain --variant full --causal yes --dtype f16 --budget 1"
echo "== new"; timeout 90 $D/bench $B --json $OUT/ours.json 2>&1 | grep -E "plain|full"
echo "== base (main 373c62c)"; timeout 90 $D/bench-base $B --json $OUT/base.json 2>&1 | grep -E "plain|full"
echo "== peer"; timeout 120 python3 .devrun-speed/torch_peer.py --json $OUT/peer.json 2>&1 | tail -30
echo "== new, knob halves (full)"; SELATTN_COOP_ABLATE=halves timeout 60 $D/bench --shape 4,16,4096,64 --shape 1,16,16384,64 --variant full --causal yes --dtype f16 --budget 1 --json $OUT/halves-off.json 2>&1 | grep full
