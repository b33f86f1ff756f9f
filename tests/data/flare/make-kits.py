#!/usr/bin/env python3
"""Regenerates the NVIDIA FLARE startup kits that cvm-warden's kit verification tests use.

Run with the Python of a virtual environment that has nvflare 2.9.0:

    python3 -m venv /tmp/flare-venv && /tmp/flare-venv/bin/pip install nvflare==2.9.0
    /tmp/flare-venv/bin/python tests/data/flare/make-kits.py

It provisions two projects (`kit_a`, `kit_b`) with `nvflare provision`, each with one server
and one client `site-1` whose project.yml entry names a `cc_config` (compute_env
`onprem_cvm`): that makes the client CC-enabled, so FLARE's own SignatureBuilder signs the
whole participant folder from its root (a `signature.json` in every directory, RSA-PSS with
the project's root CA key). Only the client folder `site-1` of each project is kept, as
`kit-a/site-1` and `kit-b/site-1`, with `kit-a.root-ca-sha256` / `kit-b.root-ca-sha256`
beside them: the SHA-256 of the DER certificate in `startup/rootCA.pem`, as
`openssl x509 -noout -fingerprint -sha256 -in rootCA.pem` prints it (without the colons).
`kit-a.pss-salt32.json` holds one more signature by kit_a's root key, of `startup/start.sh`
with a 32-byte PSS salt: FLARE's verifier accepts any salt length, so cvm-warden must too.
The root CA private keys are not kept.

The private keys in the kits are test-only: every run makes new ones.
"""

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

HERE = os.path.dirname(os.path.abspath(__file__))

CC_YAML = """compute_env: onprem_cvm
cc_cpu_mechanism: amd_sev_snp
cc_issuers: []
"""

PROJECT_YAML = """api_version: 3
name: {name}
description: cvm-warden test kit (test-only keys)
participants:
  - name: server1
    type: server
    org: test
    fed_learn_port: 8002
  - name: site-1
    type: client
    org: test
    cc_config: {cc}
builders:
  - path: nvflare.lighter.impl.workspace.WorkspaceBuilder
    args:
      template_file:
        - master_template.yml
  - path: nvflare.lighter.impl.static_file.StaticFileBuilder
    args:
      config_folder: config
  - path: nvflare.lighter.cc_provision.impl.cc.CCBuilder
  - path: nvflare.lighter.impl.cert.CertBuilder
  - path: nvflare.lighter.impl.signature.SignatureBuilder
"""


def provision(work, name):
    cc = os.path.join(work, "cc.yml")
    with open(cc, "w") as f:
        f.write(CC_YAML)
    project = os.path.join(work, f"{name}.yml")
    with open(project, "w") as f:
        f.write(PROJECT_YAML.format(name=name, cc=cc))
    nvflare = os.path.join(os.path.dirname(sys.executable), "nvflare")
    ws = os.path.join(work, f"ws-{name}")
    subprocess.run([nvflare, "provision", "-p", project, "-w", ws], check=True, cwd=work)
    kit = os.path.join(ws, name, "prod_00", "site-1")
    if not os.path.exists(os.path.join(kit, "signature.json")):
        sys.exit(f"{kit} has no signature.json: the CC builder did not enable site-1")
    with open(os.path.join(ws, name, "state", "cert.json")) as f:
        root_key = serialization.load_pem_private_key(json.load(f)["root_pri_key"].encode(), None)
    return kit, root_key


def salt32_signature(root_key, path):
    """An RSA-PSS signature with a 32-byte salt (FLARE signs with the maximum, 222 bytes, but
    its verifier, PSS.MAX_LENGTH through OpenSSL, accepts any salt length)."""
    with open(path, "rb") as f:
        data = f.read()
    sig = root_key.sign(data, padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32), hashes.SHA256())
    return base64.b64encode(sig).decode()


def main():
    with tempfile.TemporaryDirectory() as work:
        for name, out in (("kit_a", "kit-a"), ("kit_b", "kit-b")):
            kit, root_key = provision(work, name)
            dest = os.path.join(HERE, out)
            shutil.rmtree(dest, ignore_errors=True)
            os.makedirs(dest)
            shutil.copytree(kit, os.path.join(dest, "site-1"), symlinks=True)
            with open(os.path.join(kit, "startup", "rootCA.pem"), "rb") as f:
                cert = x509.load_pem_x509_certificate(f.read())
            with open(os.path.join(HERE, f"{out}.root-ca-sha256"), "w") as f:
                f.write(cert.fingerprint(hashes.SHA256()).hex() + "\n")
            if out == "kit-a":
                vector = {"startup/start.sh": salt32_signature(root_key, os.path.join(kit, "startup", "start.sh"))}
                with open(os.path.join(HERE, "kit-a.pss-salt32.json"), "w") as f:
                    json.dump(vector, f, indent=1)
                    f.write("\n")
            print(f"wrote {dest}/site-1")


if __name__ == "__main__":
    main()
