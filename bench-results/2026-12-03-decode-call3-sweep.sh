#!/usr/bin/env bash
# Call 3 (decode teammate, 2026-12-03): tuning sweep of the decode attend kernel, heated.
D=.devrun-decode/decode
C="--heads 32 --kv-heads 8 --dim 128 --f16 --heat-ms 300"
echo "== B16x16384"; timeout 40 $D $C --prompt 16384 --batch 16 --len 101 --sweep "default;splits=2;splits=4;splits=8;splits=16;threads=128;threads=128,splits=8;threads=128,splits=16;rows=2;rows=1;threads=64,splits=16;default"
echo "== B1x131072"; timeout 40 $D $C --prompt 131072 --batch 1 --len 101 --sweep "default;splits=16;splits=64;splits=128;threads=128,splits=64;threads=128,splits=128;rows=2;rows=1;default"
echo "== B16x65536"; timeout 40 $D $C --prompt 65536 --batch 16 --len 41 --sweep "default;splits=8;splits=32;threads=128,splits=32;default"
echo "== end"
