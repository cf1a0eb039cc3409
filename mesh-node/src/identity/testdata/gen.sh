#!/bin/sh
# Regenerates the cacerts fixtures used by the identity tests (run once, output committed).
# rsa-cacerts mirrors Istio's samples/certs: an RSA root and an RSA intermediate whose key is
# PKCS#1 ("BEGIN RSA PRIVATE KEY"), 2048 bits to keep the fixture small (Istio uses 4096).
# ec-cacerts is a self-signed P-256 root whose key is SEC1 ("BEGIN EC PRIVATE KEY"), as
# `openssl ecparam -genkey` writes it. Both are valid for 100 years so the tests never rot.
set -eu
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

cat >"$tmp/ext.cnf" <<'CNF'
[root]
basicConstraints = critical, CA:true
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[intermediate]
basicConstraints = critical, CA:true, pathlen:0
keyUsage = critical, digitalSignature, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
subjectAltName = URI:spiffe://cluster.local/ns/istio-system/sa/istiod
CNF

mkdir -p rsa-cacerts ec-cacerts
openssl genrsa -traditional -out "$tmp/root-key.pem" 2048
openssl req -x509 -new -key "$tmp/root-key.pem" -sha256 -days 36500 \
  -subj "/O=Istio/CN=Root CA" -extensions root -config "$tmp/ext.cnf" -out rsa-cacerts/root-cert.pem
openssl genrsa -traditional -out rsa-cacerts/ca-key.pem 2048
openssl req -new -key rsa-cacerts/ca-key.pem -subj "/O=Istio/CN=Intermediate CA/L=cluster1" \
  -out "$tmp/ca.csr"
openssl x509 -req -in "$tmp/ca.csr" -CA rsa-cacerts/root-cert.pem -CAkey "$tmp/root-key.pem" \
  -set_serial 0x2a -sha256 -days 36500 -extensions intermediate -extfile "$tmp/ext.cnf" \
  -out rsa-cacerts/ca-cert.pem
cat rsa-cacerts/ca-cert.pem rsa-cacerts/root-cert.pem >rsa-cacerts/cert-chain.pem

openssl ecparam -name prime256v1 -genkey -noout -out ec-cacerts/ca-key.pem
openssl req -x509 -new -key ec-cacerts/ca-key.pem -sha256 -days 36500 \
  -subj "/O=Example/CN=EC Root CA" -extensions root -config "$tmp/ext.cnf" -out ec-cacerts/ca-cert.pem
cp ec-cacerts/ca-cert.pem ec-cacerts/root-cert.pem
cp ec-cacerts/ca-cert.pem ec-cacerts/cert-chain.pem
