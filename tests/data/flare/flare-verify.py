#!/usr/bin/env python3
"""Runs NVIDIA FLARE's own kit verifier on the test kits and the tampered copies that
cvm-warden's tests make, and checks FLARE's verdict on each against what cvm-warden's
verifier says (the table below, kept in step with src/measure/flare_tests.rs): the same
verdict wherever FLARE can judge, and the cases FLARE misses listed as such.

Needs nvflare 2.9.0 (not part of `cargo test`):

    /tmp/flare-venv/bin/python tests/data/flare/flare-verify.py

Exit 0 when every verdict is as expected.
"""

import json
import os
import shutil
import sys
import tempfile

from nvflare.lighter.utils import verify_folder_signature

HERE = os.path.dirname(os.path.abspath(__file__))
SIG = "signature.json"


def change_byte(kit):
    path = os.path.join(kit, "startup", "fed_client.json")
    data = bytearray(open(path, "rb").read())
    data[10] ^= 1
    open(path, "wb").write(bytes(data))


def add_file(kit):
    open(os.path.join(kit, "local", "extra.py"), "w").write("import os\n")


def remove_file(kit):
    os.remove(os.path.join(kit, "startup", "sub_start.sh"))


def remove_dir(kit):
    shutil.rmtree(os.path.join(kit, "transfer"))


def add_dir(kit):
    os.mkdir(os.path.join(kit, "local", "custom"))
    open(os.path.join(kit, "local", "custom", "app.py"), "w").write("x = 1\n")


def symlink(kit):
    os.remove(os.path.join(kit, "startup", "start.sh"))
    os.symlink("sub_start.sh", os.path.join(kit, "startup", "start.sh"))


def copied_entry(kit):
    startup = os.path.join(kit, "startup")
    shutil.copy(os.path.join(startup, "start.sh"), os.path.join(startup, "stop_fl.sh"))
    sigs = json.load(open(os.path.join(startup, SIG)))
    sigs["stop_fl.sh"] = sigs["start.sh"]
    json.dump(sigs, open(os.path.join(startup, SIG), "w"))


def submitter_cert(kit):
    open(os.path.join(kit, "local", ".__nvfl_submitter.crt"), "w").write("cert")


def swapped_root_ca(kit):
    shutil.copy(os.path.join(HERE, "kit-b", "site-1", "startup", "rootCA.pem"),
                os.path.join(kit, "startup", "rootCA.pem"))


def salt32(kit):
    vector = json.load(open(os.path.join(HERE, "kit-a.pss-salt32.json")))
    path = os.path.join(kit, "startup", SIG)
    sigs = json.load(open(path))
    sigs["start.sh"] = vector["startup/start.sh"]
    json.dump(sigs, open(path, "w"))


def no_key(kit):
    os.remove(os.path.join(kit, "startup", "client.key"))


# (name, kit, tamper, root CA given to FLARE, FLARE's verdict, cvm-warden's verdict)
CASES = [
    ("good kit", "kit-a", None, "own", True, True),
    ("other project's kit, kit-a's root", "kit-b", None, "kit-a", False, False),
    ("changed byte", "kit-a", change_byte, "own", False, False),
    ("added file", "kit-a", add_file, "own", False, False),
    ("added directory", "kit-a", add_dir, "own", False, False),
    ("symlink", "kit-a", symlink, "own", False, False),
    # kit-b's rootCA.pem in kit-a: FLARE, given the kit's own rootCA.pem, fails every
    # signature; cvm-warden fails on the pin first.
    ("swapped rootCA.pem", "kit-a", swapped_root_ca, "own", False, False),
    # What FLARE's check misses and cvm-warden refuses:
    ("removed file", "kit-a", remove_file, "own", True, False),
    ("removed directory", "kit-a", remove_dir, "own", True, False),
    ("copied signature entry", "kit-a", copied_entry, "own", True, False),
    ("submitter certificate", "kit-a", submitter_cert, "own", True, False),
    # A 32-byte PSS salt instead of the maximum: FLARE's verifier accepts any salt length.
    ("PSS salt of 32 bytes", "kit-a", salt32, "own", True, True),
    # Accepted by both when the policy withholds startup/client.key.
    ("client.key withheld", "kit-a", no_key, "own", True, True),
]


def main():
    failures = 0
    for name, kit, tamper, root, flare_expected, warden in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            copy = os.path.join(tmp, "site-1")
            shutil.copytree(os.path.join(HERE, kit, "site-1"), copy, symlinks=True)
            if tamper:
                tamper(copy)
            if root == "own":
                root_ca = os.path.join(copy, "startup", "rootCA.pem")
            else:
                root_ca = os.path.join(HERE, root, "site-1", "startup", "rootCA.pem")
            verdict = verify_folder_signature(copy, root_ca, single_signer=True, signature_file=SIG)
        ok = verdict == flare_expected
        failures += 0 if ok else 1
        note = "" if verdict == warden else "  (FLARE misses this; cvm-warden refuses)"
        print(f"{'ok ' if ok else 'BAD'} {name}: FLARE {'accepts' if verdict else 'refuses'},"
              f" cvm-warden {'accepts' if warden else 'refuses'}{note}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
