#!/bin/bash
# make-pki.sh DIR: a throwaway PKI for the TLS tests, made with openssl.
#   DIR/server/      server-cert.pem (CN and SAN localhost, IP 127.0.0.1), server-key.pem, ca-cert.pem
#   DIR/alice/       a client directory as libnbd and qemu read it: ca-cert.pem, client-cert.pem
#                    (CN alice, SAN DNS alice.example), client-key.pem
#   DIR/bob/         the same for bob, signed by the same CA
#   DIR/mallory/     a client certificate signed by another CA, with the right ca-cert.pem
#   DIR/anonymous/   ca-cert.pem only: verifies the server, presents no certificate
#   DIR/wrong-ca/    trusts only the other CA: cannot verify the server
set -euo pipefail
dir=$1
mkdir -p "$dir" && cd "$dir"
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
ca() { # name cn
  key "$1-key.pem"
  openssl req -x509 -new -key "$1-key.pem" -out "$1-cert.pem" -days 3650 -subj "/CN=$2" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
}
leaf() { # ca out-prefix cn extensions
  key "$2-key.pem"
  openssl req -new -key "$2-key.pem" -out "$2.csr" -subj "/CN=$3"
  printf '%s\n' "$4" > "$2.ext"
  openssl x509 -req -in "$2.csr" -CA "$1-cert.pem" -CAkey "$1-key.pem" -CAcreateserial \
    -out "$2-cert.pem" -days 3650 -extfile "$2.ext" 2>/dev/null
}
ca ca "nbd-rs test CA"
ca other "some other CA"
mkdir -p server alice bob mallory anonymous wrong-ca
leaf ca server/server localhost "$(printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE')"
for who in alice bob; do
  leaf ca "$who/client" "$who" "$(printf 'subjectAltName=DNS:%s.example\nextendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE' "$who")"
  cp ca-cert.pem "$who/"
done
leaf other mallory/client alice "$(printf 'subjectAltName=DNS:alice.example\nextendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE')"
cp ca-cert.pem server/ && cp ca-cert.pem mallory/ && cp ca-cert.pem anonymous/
cp other-cert.pem wrong-ca/ca-cert.pem
chmod 600 server/server-key.pem */client-key.pem
rm -f ./*.srl ./*/*.csr ./*/*.ext
