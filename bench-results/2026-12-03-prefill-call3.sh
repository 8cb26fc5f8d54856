#!/bin/bash
# call 3: softmax forms on top of pairs (default then: pairs + rot), plain causal f16 D64/D128 (+ full), checked; GPU tests
B=.devrun-prefill/bench
A="--shape 4,16,4096,64 --shape 4,16,4096,128 --causal yes --dtype f16 --budget 0.3"
for k in none +quads +keep +kv4 +keep,+kv4 +p2,+kv4 +ilp pairs,fixed,rot none; do
  echo "=== $k"
  V="--variant plain"; case $k in none|+keep,+kv4|+quads) V="--variant plain --variant full";; esac
  SELATTN_COOP_ABLATE=$k timeout 60 $B $A $V 2>&1 | grep -E "^4,|bench:"
done
echo "=== tests (defaults)"
for t in f16 selective forward coop_primitives airtight; do timeout 120 .devrun-prefill/$t 2>&1 | grep -E "^test |test result"; done
echo "=== tests +keep,+kv4"
for t in f16 selective; do SELATTN_COOP_ABLATE=+keep,+kv4 timeout 120 .devrun-prefill/$t 2>&1 | grep -E "test result"; done
