#!/usr/bin/env bash
# selective (issue 11 item 2), call A: tests with the new defaults (colsum KPW=4, SELP, SGPREFIX),
# the forward profile (pre-passes vs kernel), and the knobs. Wall cap 120 s.
R=.devrun-selective
cd $R && tar xJf bins.tar.xz && cd - >/dev/null
T0=$SECONDS
m() { echo "== $((SECONDS - T0))s $*"; }
left() { [ $((SECONDS - T0)) -lt "$1" ]; }
L=$OUT/sel; mkdir -p $L
OLD=colkpw1,selp,sgprefix
for t in selective f16 forward airtight; do
  m test $t; timeout 40 $R/$t > $L/test-$t.txt 2>&1; echo "rc $?"; grep -E "test result|FAILED|panicked" $L/test-$t.txt | head -6
done
m test f16+selective, old forms $OLD
SELATTN_COOP_ABLATE=$OLD timeout 20 $R/f16 > $L/test-f16-old.txt 2>&1; echo "rc $?"; grep -E "test result|panicked" $L/test-f16-old.txt | head -3
SELATTN_COOP_ABLATE=$OLD timeout 20 $R/selective > $L/test-sel-old.txt 2>&1; echo "rc $?"; grep -E "test result|panicked" $L/test-sel-old.txt | head -3
m test f16, sgprefix with workgroup barriers
SELATTN_COOP_ABLATE=sgbar timeout 20 $R/f16 > $L/test-f16-sgbar.txt 2>&1; echo "rc $?"; grep -E "test result|panicked" $L/test-f16-sgbar.txt | head -3
m test backward coop_backward; timeout 25 $R/backward coop_backward --test-threads 1 > $L/test-backward.txt 2>&1; echo "rc $?"; grep -E "test result|FAILED|panicked" $L/test-backward.txt | head -4
B="--causal yes --dtype f16 --heat-ms 200"
m bench defaults, checked, profiled
timeout 45 $R/bench --shape 4,16,4096,64 --shape 4,16,4096,128 --shape 4,32,8,4096,4096,128 --shape 1,16,16384,64 --variant plain --variant selective --variant full $B --budget 0.4 --profile --json $L/bench-default.json 2>&1 | grep -E "yes|profile|rror"
for k in $OLD sgprefix selp colkpw1 colkpw8 sgbar x-noprefix x-nosels colkpw2 halves x-noselk; do
  left 110 || { m skipped $k; continue; }
  m ablate $k; SELATTN_COOP_ABLATE=$k timeout 12 $R/bench --shape 4,16,4096,64 --shape 4,16,4096,128 --variant selective $B --budget 0.25 --no-check --profile 2>&1 | grep -E "yes|profile|rror"
done
m end
tar czf $OUT/selective.tar.gz -C $OUT sel && rm -rf $L
