#!/bin/sh
# A development CA and the services' TLS certificate for the compose stack (openssl only).
#
#   sh deploy/compose/make-dev-certs.sh [--out DIR] [NAME ...]
#
# Writes into DIR (default deploy/compose/secrets/tls, git-ignored, mode 0700):
#   ca.crt   the dev CA (clients trust it: CLINISYNTH_TLS_CA=deploy/compose/secrets/tls/ca.crt)
#   ca.key   its key: stays here, never mounted (0400)
#   tls.crt  the services' certificate, signed by the CA; names: generator, reward,
#            counterfactual, finetune, localhost, 127.0.0.1 and every NAME given (a DNS name or
#            an IP address, e.g. the host's name when CLINISYNTH_BIND serves other hosts)
#   tls.key  its key (0444 inside the 0700 folder, like secrets/triton.key: the containers' user
#            must read it, no other host user can reach it)
# The certificate also carries the client-auth usage: with CLINISYNTH_TLS_CLIENT_CA (mTLS) the
# containers' health checks present it. Client certificates for machine callers: sign them with
# the same CA (extendedKeyUsage=clientAuth) and map them in the service-accounts file.
# Run again to rotate: a new service key and certificate from the same CA (an existing CA is
# kept; delete ca.key and ca.crt to make a new one, then give clients the new ca.crt), then
# (compose mounts each secret file by its inode, so the replaced files need new containers)
#   docker compose -f deploy/compose/compose.yaml up -d --force-recreate generator reward counterfactual finetune
# For production hosts use a certificate from the hospital's CA at the same paths instead.
set -eu

out="$(dirname "$0")/secrets/tls"
if [ "${1:-}" = "--out" ]; then
    [ $# -ge 2 ] || { echo "usage: $0 [--out DIR] [NAME ...]" >&2; exit 2; }
    out=$2
    shift 2
fi
ca_days=${CLINISYNTH_DEV_CA_DAYS:-3650}
cert_days=${CLINISYNTH_DEV_CERT_DAYS:-365}

command -v openssl >/dev/null 2>&1 || { echo "$0: openssl not found" >&2; exit 1; }
umask 077
mkdir -p "$out"
chmod 0700 "$out"
[ -d "$(dirname "$out")" ] && [ "$(basename "$(dirname "$out")")" = secrets ] \
    && chmod 0700 "$(dirname "$out")"

sans="DNS:generator,DNS:reward,DNS:counterfactual,DNS:finetune,DNS:localhost,IP:127.0.0.1"
for name in "$@"; do
    case $name in
        *[!0-9.]*) case $name in *:*) sans="$sans,IP:$name" ;; *) sans="$sans,DNS:$name" ;; esac ;;
        *) sans="$sans,IP:$name" ;;
    esac
done

work=$(mktemp -d "$out/.new.XXXXXX")  # same file system: the final mv is a rename
trap 'rm -rf "$work"' EXIT
# openssl's chatter only when it fails
quiet() { "$@" 2>"$work/stderr" || { cat "$work/stderr" >&2; return 1; }; }

if [ ! -s "$out/ca.key" ] || [ ! -s "$out/ca.crt" ]; then
    quiet openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$out/ca.key" -out "$out/ca.crt" -days "$ca_days" -sha256 \
        -subj "/O=clinisynth/CN=clinisynth development CA" \
        -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -addext "subjectKeyIdentifier=hash"
    chmod 0400 "$out/ca.key"
    chmod 0444 "$out/ca.crt"
    echo "new development CA: $out/ca.crt"
fi

cat >"$work/ext.cnf" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=$sans
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
EXT
quiet openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$work/tls.key" -out "$work/tls.csr" -subj "/O=clinisynth/CN=clinisynth"
quiet openssl x509 -req -in "$work/tls.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -days "$cert_days" -sha256 \
    -extfile "$work/ext.cnf" -out "$work/tls.crt"
openssl verify -CAfile "$out/ca.crt" -purpose sslserver "$work/tls.crt" >/dev/null
chmod 0444 "$work/tls.key" "$work/tls.crt"
# replace both files only once both exist (a running service never sees half a pair)
mv -f "$work/tls.key" "$out/tls.key"
mv -f "$work/tls.crt" "$out/tls.crt"
echo "service certificate: $out/tls.crt ($sans), valid $cert_days days"
