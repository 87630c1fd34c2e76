#!/bin/sh
# Builds the libFuzzer targets with clang and runs each one in turn.
#   fuzz/run.sh [seconds per target, default 600] [build dir, default build/fuzz] [targets...]
# Corpora grow in <build dir>/corpus_<target>; seeds come from fuzz/corpus/<target>
# (regenerate with fuzz/make_corpus.py), a dictionary from fuzz/<target>.dict if there is
# one. Crashes are left as crash-* in the build dir, each target's output in
# <build dir>/fuzz_<target>.log. Exits 1 if any target found something.
# FUZZ_RUNS=N stops each target after N executions (or the time limit, whichever first).
# peft_fourier (FourierFT / C3A files) is built where FFTW is installed; name it to run it.
set -eu
secs=${1:-600}
here=$(cd "$(dirname "$0")" && pwd)
build=${2:-$here/../build/fuzz}
mkdir -p "$build" && build=$(cd "$build" && pwd)
cxx=${CXX_FUZZ:-clang++-14}
cmake -S "$here" -B "$build" -DCMAKE_CXX_COMPILER="$cxx" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
if [ $# -ge 2 ]; then shift 2; else shift $#; fi
targets=${*:-safetensors peft_config gguf peft_structured}
cmake --build "$build" -j1 --target $(for t in $targets; do printf "fuzz_%s " "$t"; done)
for t in $targets; do
  # peft_structured inputs hold a config and a safetensors file (the fixtures: up to 14 KB)
  maxlen=4096; { [ "$t" = peft_structured ] || [ "$t" = peft_fourier ] || [ "$t" = peft_gralora_unilora ]; } && maxlen=16384
  mkdir -p "$build/corpus_$t"
  log="$build/fuzz_$t.log"
  rc=0
  dict=; [ -f "$here/$t.dict" ] && dict="-dict=$here/$t.dict"
  runs=; [ -n "${FUZZ_RUNS:-}" ] && runs="-runs=$FUZZ_RUNS"
  (cd "$build" && "./fuzz_$t" -max_total_time="$secs" -max_len=$maxlen -print_final_stats=1 $dict $runs \
      "corpus_$t" "$here/corpus/$t" >"$log" 2>&1) || rc=$?
  # The final "#N DONE cov: .. ft: .." line and the stat:: lines; the whole tail on a finding.
  echo "== fuzz_$t (exit $rc, log $log)"
  grep -E "DONE|^stat::" "$log" || true
  [ "$rc" -eq 0 ] || { tail -60 "$log"; status=1; }
done
exit "${status:-0}"
