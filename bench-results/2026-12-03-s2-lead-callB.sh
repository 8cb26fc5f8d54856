#!/usr/bin/env bash
# Lead call B (2026-12-03, second session): the merged main on the H200: every GPU test binary,
# the prefill / backward / decode benches and the peer (torch_peer.py) for each, in one call.
# Output: $OUT/callB.txt (transcript), $OUT/lead.tar.gz (JSON), helpers' slots $OUT/<name>.log.
R=.devrun-lead
cd $R && tar xJf bins.tar.xz && cd - >/dev/null
W=$(mktemp -d)
T0=$SECONDS
m() { echo "== $((SECONDS - T0))s $(date +%T) $*"; }
{
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
git log --oneline -1 2>/dev/null
m tests
for t in forward f16 selective coop_primitives airtight merge; do echo "-- $t"; timeout 40 $R/$t 2>&1 | grep -E "test result|FAILED|panicked"; done
echo "-- decode"; timeout 45 $R/decode-test 2>&1 | grep -E "test result|FAILED|panicked"
echo "-- backward"; timeout 75 $R/backward --test-threads 1 2>&1 | grep -E "test result|FAILED|panicked"
m prefill bench
timeout 100 $R/bench --shape 4,16,4096,64 --shape 4,16,4096,128 --shape 1,16,16384,64 --shape 4,32,8,4096,4096,128 --variant plain --variant temp --variant full --causal yes --dtype f16 --budget 0.5 --json $W/prefill.json 2>&1 | grep -E " yes |rror"
m prefill peer
timeout 130 python3 $R/peer_alarm.py 40 --shape 4,16,4096,64 --shape 4,16,4096,128 --shape 4,32,8,4096,128 --json $W/peer-prefill.json 2>&1 | grep -vE "^\s*$" | tail -22
m backward bench
timeout 60 $R/bench --backward --profile --shape 4,16,4096,64 --shape 4,16,4096,128 --causal yes --dtype f16 --variant plain --variant full --warmup 1 --iters 5 --budget 1 --json $W/backward.json 2>&1 | grep -E "bwd|profile|rror"
m backward peer
timeout 100 python3 $R/peer_alarm.py 30 --backward --shape 4,16,4096,64 --shape 4,16,4096,128 --json $W/peer-backward.json 2>&1 | grep -vE "^\s*$" | tail -8
m decode
D=$R/decode-ex; C="--heads 32 --kv-heads 8 --dim 128 --check 0 --no-prune --f16"
dr() { local t=$1; shift; echo "-- $*"; timeout $t $D "$@" --json $W/decode-$(echo "$*" | tr -dc '0-9a-z-' | cut -c1-70).json 2>&1 | grep -E "segments|budget|sweep|per .*timed|^ *[0-9.]+/|rror|panicked" | cut -c1-230; }
dr 25 $C --prompt 131072 --batch 1 --len 301
dr 25 $C --prompt 16384 --batch 16 --len 301
dr 30 $C --prompt 65536 --batch 16 --len 101
dr 25 $C --prompt 131072 --batch 1 --len 301 --max-buffer-bytes 67108864
dr 25 $C --prompt 16384 --batch 16 --len 301 --max-buffer-bytes 16777216
dr 30 $C --prompt 16384 --batch 16 --len 101 --max-buffer-bytes 16777216 --sweep "default;splits=2;splits=4;splits=16;splits=32"
echo "-- GATHER=0"; SELATTN_DECODE_SEGMENT_GATHER=0 timeout 25 $D $C --prompt 16384 --batch 16 --len 101 --max-buffer-bytes 16777216 2>&1 | grep -E "segments|budget|rror" | cut -c1-230
echo "-- checked selective segmented"; timeout 25 $D --heads 8 --kv-heads 2 --dim 128 --f16 --selective --prompt 2000 --batch 2 --len 64 --check 8 --max-buffer-bytes 262144 2>&1 | grep -E "segments|budget|err|rror|panicked" | cut -c1-230
m decode peer
timeout 60 python3 $R/torch_peer.py --decode --shape 1,32,8,131072,128 --shape 16,32,8,16384,128 --shape 16,32,8,65536,128 --json $W/peer-decode.json 2>&1 | tail -5
m lead done
} 2>&1 | tee $OUT/callB.txt
tar czf $OUT/lead.tar.gz -C $W .
for nc in prefill2:60 selective2:50 backward2:50 decode2:45; do
  n=${nc%%:*}; cap=${nc##*:}
  [ -f .devrun-$n/go.sh ] || continue
  [ $((SECONDS + cap)) -lt 575 ] || { echo "== $n skipped: no time left ($SECONDS s)"; continue; }
  echo "== $n start $(date +%T) cap $cap s"
  timeout -k 5 $cap bash .devrun-$n/go.sh > $OUT/$n.log 2>&1
  echo "== $n rc=$? end $(date +%T)"; tail -n 6 $OUT/$n.log
done
