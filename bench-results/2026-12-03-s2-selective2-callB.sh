#!/usr/bin/env bash
# selective round 2 (issue 11), call B slot (50 s): opt-in candidates +cpre (coop forward: the next
# key tile's carried C prefetched into registers) and +pscan (F scan in 8 row parts per column).
R=.devrun-selective2
cd $R && tar xJf bins.tar.xz && cd - >/dev/null
T0=$SECONDS
m() { echo "== $((SECONDS - T0))s $*"; }
left() { [ $((SECONDS - T0)) -lt "$1" ]; }
L=$OUT/selective2; mkdir -p $L
KN=+cpre,+pscan
t() {
  m test $1 with $KN; SELATTN_COOP_ABLATE=$KN timeout $2 $R/$1 > $L/test-$1-knob.txt 2>&1; echo "rc $?"
  grep -E "test result|FAILED|panicked" $L/test-$1-knob.txt | head -4
}
t selective 8; t f16 12; t airtight 6
B="--shape 4,16,4096,64 --shape 4,16,4096,128 --shape 1,16,16384,64 --variant selective --causal yes --dtype f16 --budget 0.3 --heat-ms 200 --profile"
for k in "" $KN "" +cpre; do
  left 40 || { m skipped bench "${k:-default}"; continue; }
  m bench "${k:-default}"; SELATTN_COOP_ABLATE=$k timeout 9 $R/bench $B 2>&1 | tee -a $L/bench.txt | grep -E "yes|profile|rror"
done
if left 37; then t forward $((48 - SECONDS + T0)); else m skipped test forward; fi
m end
tar czf $OUT/selective2.tar.gz -C $OUT selective2 && rm -rf $L
