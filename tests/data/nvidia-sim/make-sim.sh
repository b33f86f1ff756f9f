#!/bin/sh
# Generates the simulated GPU's TEST PKI (run once; the output is committed):
#   sh tests/data/nvidia-sim/make-sim.sh
# Needs openssl (Debian: openssl) and xxd (Debian: xxd). P-384 everywhere, as NVIDIA's chain.
#   root.pem          "cvm-warden TEST GPU root — not NVIDIA" (self-signed CA)
#   intermediate.pem  "cvm-warden TEST GPU intermediate — not NVIDIA" (CA, signed by root)
#   leaf.pem          "cvm-warden TEST GPU FMC LF — not NVIDIA" (digitalSignature only), with the
#                     Hopper FWID extension 2.23.133.5.4.1 =
#                     SEQUENCE{INTEGER 1, SubjectPublicKeyInfo, SEQUENCE{OID sha384, OCTET STRING(48)}}
#                     carrying the FWID of report.bin (opaque field 20), laid out as NVIDIA's leaf
#   chain.pem         leaf, intermediate, root (what NVML's attestationCertChain would hold)
#   leaf-key.pk8      the leaf's PRIVATE key (PKCS#8 DER): TEST ONLY, it signs simulated reports
# report.bin is not generated: it is shared/vectors/nvidia/derived/nvtrust-hopperAttestationReport.bin
# (a real H100 report, see README.md), whose nonce and signature the simulated NVML replaces.
set -eu
cd "$(dirname "$0")"
FWID=f5c384aebb579217a2c66b17ed0f28e6a9b8d639041acd7b4721cec004f7275494ba94bb5cdfdb3055ee051762b1f75d
# The FWID must be the template report's (opaque type 20 = 0x0014, size 48 = 0x0030).
xxd -p report.bin | tr -d '\n' | grep -q "14003000${FWID}" || { echo "report.bin lacks FWID $FWID" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
gen() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-384 -out "$tmp/$1.key"; }
gen root; gen intermediate; gen leaf
cat > "$tmp/ext.cnf" <<CNF
[root]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[intermediate]
basicConstraints = critical, CA:TRUE, pathlen:1
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[leaf]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
2.23.133.5.4.1 = DER:@FWIDEXT@
CNF
spki=$(openssl pkey -in "$tmp/leaf.key" -pubout -outform DER | xxd -p | tr -d '\n')
spki_len=$(( ${#spki} / 2 ))
# SEQUENCE{INTEGER 1, SPKI, SEQUENCE{OID 2.16.840.1.101.3.4.2.2, OCTET STRING FWID}}
inner="020101${spki}303d0609608648016503040202 0430${FWID}"
inner=$(echo "$inner" | tr -d ' ')
len=$(( ${#inner} / 2 ))
[ "$spki_len" -eq 120 ] || { echo "unexpected SPKI length $spki_len" >&2; exit 1; }
ext=$(printf '3081%02x%s' "$len" "$inner")
sed -i "s/@FWIDEXT@/$(echo "$ext" | sed 's/../&:/g; s/:$//')/" "$tmp/ext.cnf"
days=36500
openssl req -new -x509 -utf8 -key "$tmp/root.key" -subj "/O=cvm-warden TEST/CN=cvm-warden TEST GPU root — not NVIDIA" \
  -days $days -sha384 -extensions root -config "$tmp/ext.cnf" -out root.pem 2>/dev/null || \
openssl req -new -x509 -utf8 -key "$tmp/root.key" -subj "/O=cvm-warden TEST/CN=cvm-warden TEST GPU root — not NVIDIA" \
  -days $days -sha384 -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" -out root.pem
sign() { # name issuer subject-CN
  openssl req -new -utf8 -key "$tmp/$1.key" -subj "/O=cvm-warden TEST/CN=$3" -out "$tmp/$1.csr"
  openssl x509 -req -in "$tmp/$1.csr" -CA "$2.pem" -CAkey "$tmp/$2.key" -set_serial "0x$(openssl rand -hex 16)" \
    -days $days -sha384 -extfile "$tmp/ext.cnf" -extensions "$1" -out "$1.pem"
}
sign intermediate root "cvm-warden TEST GPU intermediate — not NVIDIA"
sign leaf intermediate "cvm-warden TEST GPU FMC LF — not NVIDIA"
cat leaf.pem intermediate.pem root.pem > chain.pem
openssl pkcs8 -topk8 -nocrypt -in "$tmp/leaf.key" -outform DER -out leaf-key.pk8
openssl verify -CAfile root.pem -untrusted intermediate.pem leaf.pem
echo "root SHA-256 fingerprint: $(openssl x509 -in root.pem -outform DER | sha256sum | cut -d' ' -f1)"
