#!/bin/bash
# call 1: timing-only ablations of the plain coop kernel (SELATTN_COOP_ABLATE x-knobs), D64 and D128 causal f16
B=.devrun-prefill/bench
A="--shape 4,16,4096,64 --shape 4,16,4096,128 --variant plain --causal yes --dtype f16 --budget 0.3"
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv
for k in none x-nosm x-nomax x-noexp x-nostage x-nold x-nostage,x-nold x-nos x-nopv x-nos,x-nopv x-nobar x-nosm,x-nostage,x-nold none; do
  echo "=== $k"
  if [ $k = none ]; then timeout 60 $B $A; else SELATTN_COOP_ABLATE=$k timeout 60 $B $A --no-check; fi 2>&1 | grep -v "^$"
done
