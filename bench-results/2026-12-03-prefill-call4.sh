#!/bin/bash
# call 4 (final): GPU tests (defaults and fallbacks), bench of branch prefill (67639fa) and main (ec924b6, bench-base), peer
D=.devrun-prefill
A="--causal yes --dtype f16 --budget 0.5"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
echo "=== tests (defaults)"
for t in f16 selective forward coop_primitives airtight; do timeout 60 $D/$t 2>&1 | grep -E "^test |test result"; done
for k in keep,kv4 keep,kv4,pairs,fixed,rot; do
  echo "=== tests SELATTN_COOP_ABLATE=$k"
  for t in f16 selective; do SELATTN_COOP_ABLATE=$k timeout 60 $D/$t 2>&1 | grep -E "test result"; done
done
echo "=== bench (branch)"
timeout 90 $D/bench --variant plain --variant temp --variant full $A --json $OUT/ours.json
echo "=== bench (branch, SELATTN_COOP_ABLATE=keep: pairs form)"
SELATTN_COOP_ABLATE=keep timeout 30 $D/bench --shape 4,16,4096,128 --shape 4,32,8,4096,4096,128 --variant plain $A --json $OUT/ours-pairs.json
echo "=== bench-base (main ec924b6)"
timeout 60 $D/bench-base --variant plain --variant full $A --json $OUT/base.json
echo "=== peer"
timeout 150 python3 $D/torch_peer.py --json $OUT/peer.json
