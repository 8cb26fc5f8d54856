#!/usr/bin/env bash
# Call 4 (decode teammate, 2026-12-03): the planner's 128 threads at large batch, with the peer, and the decode tests.
R=.devrun-decode
D=$R/decode-ex
C="--heads 32 --kv-heads 8 --dim 128 --check 0 --trace 50 --no-prune --f16"
m() { echo "== $(date +%T.%N) $*"; }
m B16x16384 f16; timeout 40 $D $C --prompt 16384 --batch 16 --len 301 --json $OUT/b16-16k-f16.json
m B16x65536 f16; timeout 60 $D $C --prompt 65536 --batch 16 --len 101 --json $OUT/b16-64k-f16.json
m B1x131072 f16; timeout 40 $D $C --prompt 131072 --batch 1 --len 301 --json $OUT/b1-f16.json
m peer; timeout 50 python3 $R/torch_peer.py --decode --shape 1,32,8,131072,128 --shape 16,32,8,16384,128 --shape 16,32,8,65536,128 --json $OUT/peer-f16.json
m tests; timeout 60 $R/decode-test 2>&1 | grep -E "^test |test result|panicked|FAIL"
m end
