#!/usr/bin/env bash
# Lead call C (2026-12-03, second session): main with the defaults flipped after call B
# (backward DUP on, decode GROUP_PARTS on and PREFETCH at 256 threads, selective scan in parts).
R=.devrun-lead
cd $R && tar xJf bins.tar.xz && cd - >/dev/null
T0=$SECONDS
m() { echo "== $((SECONDS - T0))s $*"; }
{
m backward tests; timeout 50 $R/backward 2>&1 | grep -E "test result|FAILED|panicked"
m backward bench full; timeout 25 $R/bench --backward --profile --shape 4,16,4096,64 --shape 4,16,4096,128 --causal yes --dtype f16 --variant full --warmup 1 --iters 3 --budget 0.5 2>&1 | grep -E "bwd|profile|rror"
m decode tests; timeout 25 $R/decode-test 2>&1 | grep -E "test result|FAILED|panicked"
C="--heads 32 --kv-heads 8 --dim 128 --check 0 --no-prune --f16"
m decode B16x65536; timeout 20 $R/decode-ex $C --prompt 65536 --batch 16 --len 101 --sweep "default;parts=0,prefetch=0" 2>&1 | grep -E "sweep|rror"
m decode B1x131072; timeout 10 $R/decode-ex $C --prompt 131072 --batch 1 --len 201 --sweep "default;prefetch=0" 2>&1 | grep -E "sweep|rror"
m decode B16x16384; timeout 12 $R/decode-ex $C --prompt 16384 --batch 16 --len 201 --sweep "default;prefetch=1" 2>&1 | grep -E "sweep|rror"
m selective f16 tests; for t in selective f16; do timeout 12 $R/$t 2>&1 | grep -E "test result|FAILED|panicked"; done
m end
} 2>&1 | tee $OUT/callC.txt
