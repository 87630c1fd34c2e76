#!/usr/bin/env bash
# Compile cost of deltaw next to plain Eigen: user CPU seconds and peak RSS of the compiler
# for each TU in this folder, compiled one after another with the same flags.
#   bench/compile/run.sh [CXX] [extra flags...]       (default: g++ -O2)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$here/../.."
cxx="${1:-g++}"; shift || true
eigen_inc="$(pkg-config --cflags eigen3 2>/dev/null || echo -I/usr/include/eigen3)"
flags=(-std=c++20 -O2 -I"$root/include" $eigen_inc "$@")
out="$(mktemp -d)"; trap 'rm -rf "$out"' EXIT
printf '%-28s %8s %10s %8s\n' "TU" "user s" "peak MB" "ratio"
base=""
# name  source  extra flags (the precompiled row is the same source in deltaw::precompiled's
# mode: the adapter reader is declared, its definition lives in the library; likewise the
# eigen_instances row in deltaw::eigen_instances' mode: Eigen's SVD is declared, not compiled)
rows=(
  "plain_eigen plain_eigen"
  "deltaw_empty deltaw_empty"
  "deltaw_apply deltaw_apply"
  "readme_use readme_use"
  "deltaw_io_apply deltaw_io_apply"
  "deltaw_io_apply_precompiled deltaw_io_apply -DDELTAW_PRECOMPILED"
  "deltaw_intruders deltaw_intruders"
  "deltaw_intruders_eigen_instances deltaw_intruders -DDELTAW_EIGEN_INSTANCES"
)
for row in "${rows[@]}"; do
  read -r name tu extra <<< "$row"
  src="$here/$tu.cpp"
  /usr/bin/time -f '%U %M' -o "$out/t" "$cxx" "${flags[@]}" ${extra:-} -c "$src" -o "$out/$name.o"
  read -r user kb < "$out/t"
  [[ -z "$base" ]] && base="$user"
  printf '%-28s %8.2f %10.0f %8.2f\n' "$name" "$user" "$((kb / 1024))" "$(echo "$user / $base" | bc -l)"
done
