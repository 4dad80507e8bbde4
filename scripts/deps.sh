#!/usr/bin/env bash
# deps.sh -- install, from Debian's packages, whatever the build and tests lack.
# Idempotent: each package is checked with dpkg -s and only the missing ones are
# installed (apt-get update runs only when something is missing).
set -euo pipefail

PKGS=(
  make gcc libc6-dev pkg-config       # the C toolchain
  libopenblas-dev                     # SGEMM for every linear layer
  libcjson-dev                        # JSON: safetensors headers, vocab.json, token files
  libutf8proc-dev                     # Unicode NFC, lower-casing and categories for the tokenizer
  libcmocka-dev                       # C unit-test framework
  nettle-dev                          # SHA-256: the content identity of LoRA files
  zlib1g-dev                          # CRC-32 of the shared weights (models verify)
  libpng-dev                          # PNG in and out for luna decode / encode-image
  clang libclang-rt-14-dev            # libFuzzer targets (make fuzz)
  python3 python3-numpy python3-torch # the independent PyTorch reference
  python3-pytest python3-regex        # Python tests; \p{L} regexes for the reference tokenizer
)

missing=()
for p in "${PKGS[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "deps.sh: installing ${missing[*]}" >&2
SUDO=
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "deps.sh: need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
  SUDO=sudo
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
