#!/usr/bin/env bash
# Writes a throwaway PKI for the TLS tests into <dir> (valid one day, EC P-256 keys, fast):
#   ca.crt ca.key            the test CA
#   server.crt server.key    signed by it, for localhost / 127.0.0.1
#   client.crt client.key    signed by it (mutual TLS)
#   rogue-ca.crt, rogue-client.crt rogue-client.key   a second CA and a client certificate from it
#   other.key                a key that belongs to no certificate (mismatch tests)
# Usage: make_test_certs.sh <dir>
set -euo pipefail
dir="$1"
mkdir -p "${dir}"
cd "${dir}"
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2> /dev/null; }
ca() {  # ca <name> <CN>
  key "$1.key"
  openssl req -x509 -new -key "$1.key" -out "$1.crt" -days 1 -subj "/CN=$2" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
}
leaf() {  # leaf <name> <ca> <CN> <extensions>
  key "$1.key"
  openssl req -new -key "$1.key" -out "$1.csr" -subj "/CN=$3"
  printf '%s\n' "$4" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA "$2.crt" -CAkey "$2.key" -CAcreateserial -out "$1.crt" \
    -days 1 -extfile "$1.ext" 2> /dev/null
  rm -f "$1.csr" "$1.ext"
}
ca ca polysketch-test-ca
ca rogue-ca polysketch-rogue-ca
leaf server ca localhost "subjectAltName=DNS:localhost,IP:127.0.0.1
extendedKeyUsage=serverAuth"
leaf client ca polysketch-test-client "extendedKeyUsage=clientAuth"
leaf rogue-client rogue-ca polysketch-rogue-client "extendedKeyUsage=clientAuth"
key other.key
