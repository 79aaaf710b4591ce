#!/usr/bin/env bash
# Make a self-signed CA, a certificate for each expert host (made out to its IP address), a
# client certificate for the coordinator (mutual TLS) and the shared token, into OUT.
#
#   deploy/make-secrets.sh OUT HOST_IP [HOST_IP...]      e.g. deploy/make-secrets.sh secrets 192.168.1.21 192.168.1.22
#
# Keep ca.key offline once done: it is only needed to issue more certificates.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 OUT HOST_IP [HOST_IP...]" >&2
  exit 2
fi
out=$1
shift
mkdir -p "$out"
cd "$out"
umask 077
new_key_and_request() {  # NAME SUBJECT
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "$2" -keyout "$1.key" -out "$1.csr" 2>/dev/null
}
sign() {  # NAME EXTENSIONS
  printf '%b' "$2" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 825 -extfile "$1.ext" -out "$1.pem" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}
[[ -f ca.pem ]] || openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
  -subj "/CN=moe-edge home lab CA" -keyout ca.key -out ca.pem 2>/dev/null
for ip in "$@"; do
  new_key_and_request "expert-host-$ip" "/CN=$ip"
  sign "expert-host-$ip" "subjectAltName=IP:$ip\nextendedKeyUsage=serverAuth\n"
done
new_key_and_request coordinator "/CN=moe-edge coordinator"
sign coordinator "extendedKeyUsage=clientAuth\n"
[[ -f token ]] || openssl rand -hex 32 > token
chmod 644 ./*.pem
echo "made in $out: ca.pem ca.key token coordinator.pem/.key $(printf 'expert-host-%s.pem/.key ' "$@")"
