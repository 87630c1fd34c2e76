#!/usr/bin/env bash
# Installs what deltaw's build, tests, benchmarks and examples need on Debian 12, if missing.
set -euo pipefail
pkgs=(cmake g++ make libeigen3-dev doctest-dev libbenchmark-dev libopenblas-dev nlohmann-json3-dev libdlpack-dev
      libfftw3-dev libopenmpi-dev openmpi-bin)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all packages present"
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
echo "install-deps: installing ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
