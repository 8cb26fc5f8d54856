#!/bin/bash
# call 2: softmax/staging forms (SELATTN_COOP_ABLATE +knobs; at that commit every form was off by default), plain causal f16 D64/D128 (+ full for two), checked
B=.devrun-prefill/bench
A="--shape 4,16,4096,64 --shape 4,16,4096,128 --causal yes --dtype f16 --budget 0.3"
for k in none +fixed +fixed,+rot +pairs,+rot +p2,+rot +kv4 +p2,+rot,+kv4 +pairs,+rot,+kv4 +p2 none; do
  echo "=== $k"
  V="--variant plain"; case $k in none|+p2,+rot,+kv4) V="--variant plain --variant full";; esac
  SELATTN_COOP_ABLATE=$k timeout 60 $B $A $V 2>&1 | grep -E "^4,|bench:"
done
echo "=== tests with +p2,+rot,+kv4"
SELATTN_COOP_ABLATE=+p2,+rot,+kv4 timeout 120 .devrun-prefill/f16 2>&1 | tail -4
SELATTN_COOP_ABLATE=+p2,+rot,+kv4 timeout 120 .devrun-prefill/selective 2>&1 | tail -4
