#!/usr/bin/env bash
# backward (issue 14), call A: tests with the new defaults (EWQ quads, FQ, SDQ, KV4) and with them off,
# RQ opt-in rows; bench --backward --profile rows plain/full D64/D128, knob A/B rows. Wall cap 150 s.
cd .devrun-backward && tar xJf bins.tar.xz && cd - >/dev/null
D=.devrun-backward
T0=$(date +%s)
CAP=${CAP:-145}
left() { echo $((CAP - ($(date +%s) - T0))); }
# tm SECONDS cmd...: timeout of at most the time left; skipped under 5 s.
tm() {
  local t=$1; shift
  local l; l=$(left)
  [ "$l" -lt "$t" ] && t=$l
  if [ "$t" -lt 5 ]; then echo "(skipped, no time left: $*)"; return 99; fi
  timeout "$t" "$@"
}
S64=${S64:-"--shape 4,16,4096,64"}
S128=${S128:-"--shape 4,16,4096,128"}
C="--causal yes --dtype f16"
R=$OUT/backward-raw
mkdir -p "$R"
rows() { grep -E "bwd|profile ms|error|Error|panick" "$1" | sed 's/^  profile ms (GPU, total \([0-9.]*\)):/    gpu \1 ms:/'; }

echo "== [$(left)s left] tests, new defaults"
tm 50 $D/backward --test-threads 1 > "$R/tests-default.txt" 2>&1; rc=$?
grep -E "^test |test result|panicked" "$R/tests-default.txt" | grep -v " ok$" ; echo "rc=$rc"
if [ $rc -ne 0 ]; then
  # Isolate: coop_backward with one new form off at a time.
  for E in "SELATTN_BACKWARD_FQ=0" "SELATTN_BACKWARD_KV4=0" "SELATTN_BACKWARD_SDQ=0"; do
    echo "== [$(left)s left] coop_backward with $E"
    ( export $E; tm 18 $D/backward --test-threads 1 coop_backward > "$R/iso.txt" 2>&1; echo "rc=$?" )
    grep -E "test result|panicked|max" "$R/iso.txt" | head -4
    cat "$R/iso.txt" >> "$R/tests-isolation.txt"
  done
fi

echo "== [$(left)s left] bench, new defaults (checked)"
tm 30 $D/bench --backward --profile $S64 $S128 $C --variant plain --variant full --warmup 1 --iters 4 --budget 0.8 --json "$R/default.json" > "$R/bench-default.txt" 2>&1
rows "$R/bench-default.txt"

echo "== [$(left)s left] bench full, SELATTN_BACKWARD_RQ=1 (opt-in: seldu register form, 64-key tiles; checked)"
( export SELATTN_BACKWARD_RQ=1; tm 20 $D/bench --backward --profile $S64 $S128 $C --variant full --warmup 1 --iters 3 --budget 0.5 > "$R/bench-rq1.txt" 2>&1 )
rows "$R/bench-rq1.txt"

OFF="SELATTN_BACKWARD_QUADS=0 SELATTN_BACKWARD_SDQ=0 SELATTN_BACKWARD_FQ=0 SELATTN_BACKWARD_KV4=0"
echo "== [$(left)s left] bench, $OFF"
( export $OFF; tm 20 $D/bench --backward --profile $S64 $S128 $C --variant plain --variant full --warmup 1 --iters 3 --budget 0.5 --no-check > "$R/bench-off.txt" 2>&1 )
rows "$R/bench-off.txt"

echo "== [$(left)s left] tests, $OFF"
( export $OFF; tm 50 $D/backward --test-threads 1 > "$R/tests-off.txt" 2>&1; echo "rc=$?" )
grep -E "^test |test result|panicked" "$R/tests-off.txt" | grep -v " ok$"

echo "== [$(left)s left] coop_backward with SELATTN_BACKWARD_RQ=1"
( export SELATTN_BACKWARD_RQ=1; tm 22 $D/backward --test-threads 1 coop_backward > "$R/tests-rq1.txt" 2>&1; echo "rc=$?" )
grep -E "^test |test result|panicked" "$R/tests-rq1.txt" | grep -v " ok$" | head -12

echo "== [$(left)s left] bench, SELATTN_BACKWARD_KV4=0 (the rest on)"
( export SELATTN_BACKWARD_KV4=0; tm 14 $D/bench --backward --profile $S64 $S128 $C --variant plain --variant full --warmup 1 --iters 3 --budget 0.3 --no-check > "$R/bench-kv40.txt" 2>&1 )
rows "$R/bench-kv40.txt"

echo "== [$(left)s left] bench full, SELATTN_BACKWARD_FQ=0 (the rest on)"
( export SELATTN_BACKWARD_FQ=0; tm 9 $D/bench --backward --profile $S64 $S128 $C --variant full --warmup 1 --iters 3 --budget 0.3 --no-check > "$R/bench-fq0.txt" 2>&1 )
rows "$R/bench-fq0.txt"

echo "== [$(left)s left] bench full D64, SELATTN_BACKWARD_SDQ=0 (the rest on)"
( export SELATTN_BACKWARD_SDQ=0; tm 6 $D/bench --backward --profile $S64 $C --variant full --warmup 1 --iters 3 --budget 0.3 --no-check > "$R/bench-sdq0.txt" 2>&1 )
rows "$R/bench-sdq0.txt"

tar czf "$OUT/backward.tar.gz" -C "$OUT" backward-raw && rm -rf "$R"
echo "== done after $(( $(date +%s) - T0 )) s"
