#!/usr/bin/env bash
# Reporting call (issue 12, decode teammate): examples/decode on the shapes, the SDPA peer, tests.
R=.devrun-decode
D=$R/decode-ex
C="--heads 32 --kv-heads 8 --dim 128 --check 0 --trace 50"
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,utilization.gpu --format=csv -lms 100 > $OUT/smi.csv 2>&1 &
SMI=$!
m() { echo "== $(date +%T.%N) $*"; }
m B1x131072 f16, and pruned to 16384; timeout 40 $D $C --f16 --prompt 131072 --batch 1 --len 301 --budget 16384 --json $OUT/b1-f16.json
m B16x16384 f16; timeout 40 $D $C --no-prune --f16 --prompt 16384 --batch 16 --len 301 --json $OUT/b16-16k-f16.json
m B16x16384 f16 heat-ms 0 ablation; timeout 40 $D $C --no-prune --f16 --prompt 16384 --batch 16 --len 301 --heat-ms 0 --json $OUT/b16-16k-f16-noheat.json
m B16x65536 f16; timeout 60 $D $C --no-prune --f16 --prompt 65536 --batch 16 --len 101 --json $OUT/b16-64k-f16.json
m B1x131072 f32; timeout 40 $D $C --no-prune --prompt 131072 --batch 1 --len 301 --json $OUT/b1-f32.json
m checked selective pruned f16; timeout 20 $D --heads 8 --kv-heads 2 --dim 128 --batch 4 --prompt 1024 --len 24 --selective --budget 512 --check 8 --f16 --queries 2 --trace 0
m peer; timeout 60 python3 $R/torch_peer.py --decode --shape 1,32,8,131072,128 --shape 16,32,8,16384,128 --shape 16,32,8,65536,128 --json $OUT/peer-f16.json
timeout 30 python3 $R/torch_peer.py --decode --dtype f32 --shape 1,32,8,131072,128 --json $OUT/peer-f32.json
m tests; timeout 80 $R/decode-test 2>&1 | grep -E "^test |test result|panicked|FAIL" ; timeout 30 $R/merge 2>&1 | grep -E "^test |test result|FAIL"; SELATTN_MISUSE_CALLS=5000 timeout 30 $R/misuse --nocapture 2>&1 | grep -E "misuse \[|test result" | cut -c1-300
m end
kill $SMI
