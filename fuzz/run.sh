#!/bin/sh
# Builds the libFuzzer targets with clang and runs each one in turn.
#   fuzz/run.sh [seconds per target, default 600] [build dir, default build/fuzz] [targets...]
# Corpora grow in <build dir>/corpus_<target>; seeds come from fuzz/corpus/<target>
# (regenerate with fuzz/make_corpus.py). Crashes are left as crash-* in the build dir.
set -eu
secs=${1:-600}
here=$(cd "$(dirname "$0")" && pwd)
build=${2:-$here/../build/fuzz}
cxx=${CXX_FUZZ:-clang++-14}
cmake -S "$here" -B "$build" -DCMAKE_CXX_COMPILER="$cxx" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
if [ $# -ge 2 ]; then shift 2; else shift $#; fi
targets=${*:-safetensors peft_config gguf peft_structured}
cmake --build "$build" -j1 --target $(for t in $targets; do printf "fuzz_%s " "$t"; done)
for t in $targets; do
  # peft_structured inputs hold a config and a safetensors file (the fixtures: up to 14 KB)
  maxlen=4096; [ "$t" = peft_structured ] && maxlen=16384
  mkdir -p "$build/corpus_$t"
  (cd "$build" && "./fuzz_$t" -max_total_time="$secs" -max_len=$maxlen -print_final_stats=1 \
      "corpus_$t" "$here/corpus/$t" 2>&1 | tail -8)
done
