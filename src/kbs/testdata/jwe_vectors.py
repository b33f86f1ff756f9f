#!/usr/bin/env python3
"""Makes jwe_vectors.json: JWEs made by an implementation independent of cvm-warden
(Python `cryptography`), for src/kbs/tests.rs. Run: python3 jwe_vectors.py > jwe_vectors.json

The EC recipient key and the RSA key are test-only keys, generated once and written here.
The protected headers are written with non-sorted keys and a space, so that a client that
re-serialised the header instead of using the received string as AAD would fail."""
import base64, hashlib, json, os
from cryptography.hazmat.primitives.asymmetric import ec, rsa, padding
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.keywrap import aes_key_wrap
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

def b64u(b): return base64.urlsafe_b64encode(b).rstrip(b"=").decode()

PLAINTEXT = b"independent vector: 32-byte key \x00\x01\x02\xff"

def ec_vector():
    d = int.from_bytes(hashlib.sha256(b"cvm-warden test-only P-256 key").digest(), "big") % (2**256 - 2**224)
    recipient = ec.derive_private_key(d, ec.SECP256R1())
    eph = ec.generate_private_key(ec.SECP256R1())
    z = eph.exchange(ec.ECDH(), recipient.public_key())
    alg = b"ECDH-ES+A256KW"
    kek = hashlib.sha256((1).to_bytes(4, "big") + z + len(alg).to_bytes(4, "big") + alg
                         + (0).to_bytes(4, "big") * 2 + (256).to_bytes(4, "big")).digest()
    cek = os.urandom(32)
    nums = eph.public_key().public_numbers()
    header = ('{"enc":"A256GCM", "alg":"ECDH-ES+A256KW","epk":{"y":"%s","x":"%s","kty":"EC","crv":"P-256"}}'
              % (b64u(nums.y.to_bytes(32, "big")), b64u(nums.x.to_bytes(32, "big"))))
    protected = b64u(header.encode())
    iv = os.urandom(12)
    ct = AESGCM(cek).encrypt(iv, PLAINTEXT, protected.encode())
    return {"d": d.to_bytes(32, "big").hex(),
            "jwe": {"protected": protected, "encrypted_key": b64u(aes_key_wrap(kek, cek)),
                    "iv": b64u(iv), "ciphertext": b64u(ct[:-16]), "tag": b64u(ct[-16:])}}

def rsa_vector():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cek = os.urandom(32)
    ek = key.public_key().encrypt(cek, padding.OAEP(mgf=padding.MGF1(hashes.SHA256()),
                                                    algorithm=hashes.SHA256(), label=None))
    protected = b64u(b'{"enc":"A256GCM","alg":"RSA-OAEP-256"}')
    iv = os.urandom(12)
    ct = AESGCM(cek).encrypt(iv, PLAINTEXT, protected.encode())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    return {"pkcs8_pem": pem,
            "jwe": {"protected": protected, "encrypted_key": b64u(ek),
                    "iv": b64u(iv), "ciphertext": b64u(ct[:-16]), "tag": b64u(ct[-16:])}}

print(json.dumps({"plaintext_hex": PLAINTEXT.hex(), "ec": ec_vector(), "rsa": rsa_vector()}, indent=1))
