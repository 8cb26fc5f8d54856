#!/usr/bin/env bash
# Decode benchmark on the device (copy to .devrun/ after staging examples/decode):
# fixed-length decode over long contexts, then pruning budgets.
D=.devrun/decode
common="--heads 32 --kv-heads 8 --dim 128 --len 32 --check 0 --no-prune"
for dt in "--f16" ""; do
  for b in 1 16; do
    for n in 4096 16384 65536 131072; do
      echo "### prompt $n batch $b ${dt:-f32}"
      timeout 90 $D --prompt $n --batch $b $dt $common 2>&1 | grep -E "^budget|error|Error" | head -3
    done
  done
done
for bud in 1024 512 256; do
  echo "### pruning: prompt 64, 4096 steps, budget $bud, selective, f16"
  timeout 120 $D --prompt 64 --len 4096 --batch 1 --heads 32 --kv-heads 8 --dim 128 --f16 --selective --check 0 --budget $bud 2>&1 | grep -E "^budget|error|Error" | head -3
done
