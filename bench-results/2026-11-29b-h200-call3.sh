#!/usr/bin/env bash
# speed, final call (3): GPU test binaries (default config and the coop fallbacks), bench (new and
# main's) on the default shapes beside torch_peer.py, and a few ablations (SELATTN_COOP_ABLATE).
D=/tmp/bin; mkdir -p $D
for f in .devrun-speed/*.gz; do gunzip -c $f > $D/$(basename $f .gz); chmod +x $D/$(basename $f .gz); done
T=$OUT/tests.txt
{
for t in forward f16 selective coop_primitives airtight; do
  echo "== $t"; $D/$t --test-threads 1 2>&1 | grep -E "^test |test result|runs|FAIL|panick" | head -30
done
echo "== f16, SELATTN_COOP_ABLATE=sgbar (VSEP with the workgroup-barrier form)"
SELATTN_COOP_ABLATE=sgbar $D/f16 --test-threads 1 2>&1 | grep -E "^test |test result"
echo "== f16 + selective, SELATTN_COOP_ABLATE=vsep,ilp,prefix,colsum (every fallback)"
SELATTN_COOP_ABLATE=vsep,ilp,prefix,colsum $D/f16 --test-threads 1 2>&1 | grep -E "^test |test result"
SELATTN_COOP_ABLATE=vsep,ilp,prefix,colsum $D/selective --test-threads 1 2>&1 | grep -E "^test |test result"
echo "== f16 + selective, SELATTN_COOP_ABLATE=+ilp"
SELATTN_COOP_ABLATE=+ilp $D/f16 --test-threads 1 2>&1 | grep -E "^test |test result"
} > $T 2>&1
cat $T
B="--variant plain --variant temp --variant full --causal yes --dtype f16 --budget 1"
echo "== new"; $D/bench $B --json $OUT/ours.json 2>&1 | grep -E "plain|temp|full"
echo "== base (main 25085dd)"; $D/bench-base $B --json $OUT/base.json 2>&1 | grep -E "plain|temp|full"
A="--causal yes --dtype f16 --budget 1"
echo "== no colsum fast path (full)"; SELATTN_COOP_ABLATE=colsum $D/bench --shape 4,16,4096,64 --shape 4,16,4096,128 --shape 4,32,8,4096,4096,128 --variant full $A 2>&1 | grep full
echo "== f32 D64 plain/full (scalar path)"; $D/bench --shape 4,16,4096,64 --variant plain --variant full --causal yes --dtype f32 --budget 1 --json $OUT/ours-f32.json 2>&1 | grep -E "plain|full"
echo "== f32 D64 plain/full, base"; $D/bench-base --shape 4,16,4096,64 --variant plain --variant full --causal yes --dtype f32 --budget 1 --json $OUT/base-f32.json 2>&1 | grep -E "plain|full"
echo "== peer"; python3 .devrun-speed/torch_peer.py --json $OUT/peer.json 2>&1 | tail -40
