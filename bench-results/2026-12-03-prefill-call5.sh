#!/bin/bash
# call 5: KRAW (q/k/v read as vec4<f16>) A/B at 6ad7854, GPU tests with it (and with kv4 off: scalar kbuf + kraw)
D=.devrun-prefill
A="--causal yes --dtype f16 --budget 0.3 --variant plain --variant full"
echo "=== tests (defaults)"
for t in f16 selective forward coop_primitives airtight; do timeout 60 $D/$t 2>&1 | grep -E "test result|FAIL|panicked"; done
echo "=== tests SELATTN_COOP_ABLATE=kv4"
for t in f16 selective; do SELATTN_COOP_ABLATE=kv4 timeout 60 $D/$t 2>&1 | grep -E "test result|FAIL|panicked"; done
for k in kraw none; do
  echo "=== bench SELATTN_COOP_ABLATE=$k"
  SELATTN_COOP_ABLATE=$k timeout 60 $D/bench $A --json $OUT/bench-$k.json 2>&1 | grep -E "^[0-9],|bench:"
done
