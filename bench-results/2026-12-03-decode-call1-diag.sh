#!/usr/bin/env bash
# Call 1 (diagnostic) of the decode teammate, 2026-12-03: examples/decode staged as .devrun-decode/decode.
D=.devrun-decode/decode
C="--heads 32 --kv-heads 8 --dim 128 --no-prune --check 0 --f16"
nvidia-smi; nvidia-smi -q -d PERFORMANCE,CLOCK | head -60
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,utilization.gpu,pstate,clocks_throttle_reasons.active --format=csv -lms 50 > $OUT/smi.csv 2>&1 &
SMI=$!
m() { echo "== $(date +%T.%N) $*"; }
m A B16x16384 300; timeout 60 $D $C --prompt 16384 --batch 16 --len 300 --trace 25
m B B16x16384 300 again; timeout 60 $D $C --prompt 16384 --batch 16 --len 300 --trace 25
m C B16x16384 300 sync-steps; timeout 60 $D $C --prompt 16384 --batch 16 --len 300 --trace 25 --sync-steps
m D B1 Hq512 Hkv128 16384 300; timeout 60 $D --heads 512 --kv-heads 128 --dim 128 --no-prune --check 0 --f16 --prompt 16384 --batch 1 --len 300 --trace 25
m E B1x131072 300; timeout 60 $D $C --prompt 131072 --batch 1 --len 300 --trace 25
m F B8x16384 600; timeout 60 $D $C --prompt 16384 --batch 8 --len 600 --trace 50
m G B16x16384 1200; timeout 90 $D $C --prompt 16384 --batch 16 --len 1200 --trace 100
m end
kill $SMI
