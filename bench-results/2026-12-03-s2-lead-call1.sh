#!/usr/bin/env bash
# Lead call 1 (2026-12-03, second session): merged main f0e55d0 on the H200.
R=.devrun-lead
cd $R && tar xJf bins-lead.tar.xz && cd - >/dev/null
D=$R/decode-ex
C="--heads 32 --kv-heads 8 --dim 128 --check 0 --no-prune --f16"
m() { echo "== $(date +%T) $*"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
m B16x131072 f16; timeout 60 $D $C --prompt 131072 --batch 16 --len 101 --json $OUT/b16-128k-f16.json 2>&1 | tail -4
m B16x65536 f16; timeout 45 $D $C --prompt 65536 --batch 16 --len 101 --json $OUT/b16-64k-f16.json 2>&1 | tail -4
m B16x16384 f16; timeout 30 $D $C --prompt 16384 --batch 16 --len 301 --json $OUT/b16-16k-f16.json 2>&1 | tail -4
m B1x131072 f16; timeout 30 $D $C --prompt 131072 --batch 1 --len 301 --json $OUT/b1-128k-f16.json 2>&1 | tail -4
m B1x131072 f16 segmented 64MiB; timeout 30 $D $C --prompt 131072 --batch 1 --len 301 --max-buffer-bytes 67108864 --json $OUT/b1-128k-f16-seg.json 2>&1 | tail -5
m B16x16384 f16 segmented 16MiB; timeout 30 $D $C --prompt 16384 --batch 16 --len 301 --max-buffer-bytes 16777216 --json $OUT/b16-16k-f16-seg.json 2>&1 | tail -5
m B1x131072 f32; timeout 30 $D --heads 32 --kv-heads 8 --dim 128 --check 0 --no-prune --prompt 131072 --batch 1 --len 201 --json $OUT/b1-128k-f32.json 2>&1 | tail -4
m checked: B4x4096 f16 selective budget segmented 1MiB; timeout 60 $D --heads 32 --kv-heads 8 --dim 128 --f16 --selective --prompt 4096 --batch 4 --len 64 --check 8 --max-buffer-bytes 1048576 2>&1 | tail -8
m checked: B1x131072 f16 pruned budget 1/8; timeout 60 $D --heads 32 --kv-heads 8 --dim 128 --f16 --prompt 131072 --batch 1 --len 101 --budget 16384 --check 2 --json $OUT/b1-128k-f16-prune.json 2>&1 | tail -8
m peer decode f16; timeout 70 python3 $R/torch_peer.py --decode --shape 1,32,8,131072,128 --shape 16,32,8,16384,128 --shape 16,32,8,65536,128 --shape 16,32,8,131072,128 --json $OUT/peer-decode-f16.json 2>&1 | tail -6
m peer decode f32; timeout 40 python3 $R/torch_peer.py --decode --dtype f32 --shape 1,32,8,131072,128 --json $OUT/peer-decode-f32.json 2>&1 | tail -3
for t in forward f16 selective coop_primitives airtight merge; do m test $t; timeout 60 $R/$t 2>&1 | grep -E "test result|FAIL|panicked"; done
m test decode; timeout 90 $R/decode-test 2>&1 | grep -E "^test |test result|panicked"
m test backward; timeout 100 $R/backward --test-threads 1 2>&1 | grep -E "^test |test result|panicked"
m bench prefill; timeout 60 $R/bench --shape 4,16,4096,64 --shape 4,16,4096,128 --variant plain --variant full --causal yes --dtype f16 --budget 0.5 --json $OUT/prefill.json 2>&1 | tail -6
m bench backward; timeout 70 $R/bench --backward --profile --shape 4,16,4096,64 --shape 4,16,4096,128 --variant plain --variant full --causal yes --dtype f16 --warmup 1 --iters 5 --budget 1 --json $OUT/backward.json 2>&1 | tail -9
m bench variants; timeout 60 $R/bench --shape 4,16,4096,64 --shape 4,16,4096,128 --variant plain --variant temp --variant gate --variant sel --variant full --causal yes --dtype f16 --budget 0.3 --no-check 2>&1 | grep -v "^wrote"
for k in x-nosm x-nostage x-nold x-nos x-nopv x-nobar x-nomax x-noexp; do m ablate $k; SELATTN_COOP_ABLATE=$k timeout 30 $R/bench --shape 4,16,4096,64 --shape 4,16,4096,128 --variant plain --variant full --causal yes --dtype f16 --budget 0.3 --no-check 2>&1 | grep "yes"; done
m end
