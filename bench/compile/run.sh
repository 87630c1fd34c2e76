#!/usr/bin/env bash
# Compile cost of deltaw next to plain Eigen: user CPU seconds and peak RSS of the compiler
# for each TU in this folder, compiled one after another with the same flags.
#   bench/compile/run.sh [CXX] [extra flags...]       (default: g++ -O2)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$here/../.."
cxx="${1:-g++}"; shift || true
flags=(-std=c++20 -O2 -I"$root/include" -I/usr/include/eigen3 "$@")
out="$(mktemp -d)"; trap 'rm -rf "$out"' EXIT
printf '%-22s %8s %10s %8s\n' "TU" "user s" "peak MB" "ratio"
base=""
for tu in plain_eigen deltaw_empty deltaw_apply deltaw_io_apply readme_use ${DELTAW_COMPILE_EXTRA:-}; do
  src="$here/$tu.cpp"
  [[ -f "$src" ]] || continue
  /usr/bin/time -f '%U %M' -o "$out/t" "$cxx" "${flags[@]}" -c "$src" -o "$out/$tu.o"
  read -r user kb < "$out/t"
  [[ -z "$base" ]] && base="$user"
  printf '%-22s %8.2f %10.0f %8.2f\n' "$tu" "$user" "$((kb / 1024))" "$(echo "$user / $base" | bc -l)"
done
