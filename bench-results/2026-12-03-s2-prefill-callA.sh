#!/usr/bin/env bash
# prefill, call A (2026-12-03 s2): coop forward softmax/occupancy candidates behind
# SELATTN_COOP_ABLATE knobs. Wall cap 150 s. Bench rows are checked (small slice); ms median/min.
R=.devrun-prefill
cd $R && tar xJf bins.tar.xz && cd - >/dev/null
W=$OUT/prefill; mkdir -p $W
cp $R/go.sh $W/
T0=$SECONDS
m() { echo "== $(( SECONDS - T0 ))s $*"; }
lim() { local r=$(( 146 - (SECONDS - T0) )); [ $r -lt $1 ] && echo $r || echo $1; }  # timeout within the cap
S="--shape 4,16,4096,64 --shape 4,16,4096,128 --shape 4,32,8,4096,4096,128"
B="--causal yes --dtype f16 --budget 0.3 --heat-ms 200"
row() {  # row NAME KNOBS VARIANTS...
  local n=$1 k=$2; shift 2
  if [ $(( SECONDS - T0 )) -gt 120 ]; then m "skip bench $n: wall cap"; return; fi
  m "bench $n [SELATTN_COOP_ABLATE=$k]"
  SELATTN_COOP_ABLATE=$k timeout $(lim 20) $R/bench $S "$@" $B --json $W/bench-$n.json > $W/bench-$n.txt 2>&1
  grep " yes " $W/bench-$n.txt | awk '{printf "%-22s %-6s %8s %8s %6s %s %s\n",$1,$2,$6,$7,$8,$(NF-1),$NF}'
}
tst() {  # tst KNOBS BINARIES...
  local k=$1; shift
  for t in "$@"; do
    if [ $(( SECONDS - T0 )) -gt 138 ]; then m "skip test $t [$k]: wall cap"; continue; fi
    m "test $t [SELATTN_COOP_ABLATE=$k]"
    local f=$W/test-$t-${k//[+,]/_}.txt
    SELATTN_COOP_ABLATE=$k timeout $(lim 30) $R/$t > $f 2>&1
    grep -E "test result|FAIL|panicked" $f | head -5
    grep -E "Coop.*O rel" $f | head -3 | cut -c1-200
  done
}
tst "+one,+full,+raw,+h16,+latek,+latev" f16 selective forward coop_primitives airtight
row base "" --variant plain --variant full
row onefull "+one,+full" --variant plain --variant full
row onefullraw "+one,+full,+raw" --variant plain
row one "+one" --variant plain
row onefullh16 "+one,+full,+h16" --variant plain
row h16 "+h16" --variant plain
row latek "+latek" --variant plain
row latev "+latev" --variant plain
row onefullkv "+one,+full,+latek,+latev" --variant plain --variant full
row all5 "+one,+full,+h16,+latek,+latev" --variant plain
row all6 "+one,+full,+raw,+h16,+latek,+latev" --variant plain --variant temp
row ilp "+ilp" --variant plain
row novsep "vsep" --variant plain
row bc32onefull "bc32,+one,+full" --variant plain
row base2 "" --variant plain
tst "+one,+full" f16 selective
tst "+h16" f16
m end
cd $OUT && tar czf prefill.tar.gz prefill && rm -rf prefill
