#!/usr/bin/env bash
# Install what building and testing Tessera needs, or say exactly what is
# missing. On Debian/Ubuntu as root it installs with apt-get; elsewhere it
# prints the command to run and fails.
set -euo pipefail

missing_pkgs=()
need() { # need COMMAND-CHECK DEBIAN-PACKAGE
  if ! eval "$1" >/dev/null 2>&1; then missing_pkgs+=("$2"); fi
}

need "command -v cmake" cmake
need "command -v cc" build-essential
need "command -v c++" g++
need "command -v make" make
need "command -v curl" curl
need "command -v python3" python3
need "python3 -m venv --help" python3-venv
need "python3 -m pip --version" python3-pip
# The ledger's tests and `tessera bench ledger` start a throwaway
# PostgreSQL server on loopback (initdb + pg_ctl from Debian's package).
need "ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | grep -q . || command -v initdb" postgresql
# PostgreSQL refuses to run as root; as root the tests run it as `postgres`.
need "command -v runuser" util-linux
# The dashboard test renders the page in headless Chromium.
need "command -v chromium || command -v chromium-browser" chromium
# bindgen (llama-cpp-sys-2) needs libclang.
need "ls /usr/lib/llvm-*/lib/libclang*.so* /usr/lib/*/libclang*.so* 2>/dev/null | grep -q ." libclang-dev

if ! command -v cargo >/dev/null 2>&1; then
  echo "Rust is not installed: install it with rustup (https://rustup.rs), then run make again." >&2
  exit 1
fi

if [ ${#missing_pkgs[@]} -eq 0 ]; then
  exit 0
fi

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "Installing: ${missing_pkgs[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing_pkgs[@]}" >/dev/null
  exit 0
fi

echo "Tessera needs these system packages: ${missing_pkgs[*]}" >&2
echo "On Debian or Ubuntu: sudo apt-get install -y ${missing_pkgs[*]}" >&2
echo "Elsewhere, install the equivalents (cmake, a C/C++ compiler, libclang, curl, python3 with venv and pip, PostgreSQL, Chromium)." >&2
exit 1
