#!/usr/bin/env bash
# decode (issue 12), call A: segmented caches at (near) unsegmented speed. Wall cap 75 s (the
# timeouts below sum to 75). As run in call A (binaries from commit 9fa5ea8): B16 runs without a
# result line hit their timeout (B16 x 16384 needs more than 9 s end to end there).
R=.devrun-decode
cd $R && tar xJf bins.tar.xz && cd - >/dev/null
D=$R/decode-ex
W=$(mktemp -d)
C="--heads 32 --kv-heads 8 --dim 128 --check 0 --no-prune --f16 --len 101"
S16="--prompt 16384 --batch 16"; S1="--prompt 131072 --batch 1"
m() { echo "== $(date +%T.%N | cut -c1-12) $*"; }
row() { grep -v XDG | grep -E "budget|segments|sweep|per .* timed|rror|panicked" | sed 's/^budget     none: //'; }
m test decode; timeout 22 $R/decode-test 2>&1 | grep -E "FAILED|test result|panicked" | head -8
m B16x16384 seg16MiB per-segment partials; timeout 9 $D $C $S16 --max-buffer-bytes 16777216 --trace 50 --json $W/b16-seg.json 2>&1 | row
m B16x16384 unsegmented; timeout 8 $D $C $S16 --trace 50 --json $W/b16.json 2>&1 | row
m B1x131072 seg64MiB per-segment partials; timeout 5 $D $C $S1 --max-buffer-bytes 67108864 --trace 50 --json $W/b1-seg.json 2>&1 | row
m B1x131072 unsegmented; timeout 4 $D $C $S1 --json $W/b1.json 2>&1 | row
m B16x16384 seg16MiB shared partials GATHER=0; SELATTN_DECODE_SEGMENT_GATHER=0 timeout 9 $D $C $S16 --max-buffer-bytes 16777216 --json $W/b16-seg-shared.json 2>&1 | row
m sweep B16x16384 seg16MiB splits per segment; timeout 9 $D $C $S16 --max-buffer-bytes 16777216 --sweep "default;splits=8;splits=16" 2>&1 | row
m checked B4x4096 f16 selective, budget, seg 2MiB; timeout 9 $D --heads 32 --kv-heads 8 --dim 128 --f16 --selective --prompt 4096 --batch 4 --len 24 --check 4 --max-buffer-bytes 2097152 2>&1 | row
m end
tar czf $OUT/decode.tar.gz -C $W . 2>/dev/null
