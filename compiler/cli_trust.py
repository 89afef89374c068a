"""``npucc keygen``, ``npucc sign`` and ``npucc verify``: package signatures.

    npucc keygen -o KEY                 # KEY (private, 0600) and KEY.pub; ECDSA P-256 PEM
    npucc sign PKG --key KEY            # writes PKG/model.sig over every file of PKG
    npucc verify PKG --public-key KEY.pub [--public-key ...]

The signature is OpenSSF model-signing's key-based format (``runtime/signing.py``), so
``model_signing verify key PKG --signature PKG/model.sig --public_key KEY.pub`` accepts it too.
A password for an encrypted private key is read from the environment variable named by
``--password-env`` (never from the command line, where other users could see it).
"""

from __future__ import annotations

import argparse
import os
import sys

from compiler.errors import NpuccError

__all__ = ["configure_keygen", "configure_sign", "configure_verify", "password_from_env"]


def password_from_env(name: str | None) -> bytes | None:
    if not name:
        return None
    value = os.environ.get(name)
    if value is None:
        raise NpuccError(f"--password-env {name}: the environment variable is not set")
    return value.encode()


def configure_keygen(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", required=True, metavar="KEY",
                   help="the private key file to create (the public key goes to KEY.pub, "
                   "or KEY with .key/.pem replaced by .pub)")
    p.add_argument("--public-output", default=None, metavar="PUB",
                   help="where to write the public key instead")
    p.add_argument("--password-env", default=None, metavar="VAR",
                   help="encrypt the private key with the password in this environment variable")
    p.set_defaults(func=_cmd_keygen)


def _cmd_keygen(args: argparse.Namespace) -> int:
    from runtime.signing import generate_key, key_id, load_public_key

    priv, pub = generate_key(args.output, args.public_output, password_from_env(args.password_env))
    ident = key_id(load_public_key(pub).pem)
    print(f"wrote private key {priv} (keep it secret) and public key {pub} (key id {ident})",
          file=sys.stderr)
    return 0


def configure_sign(p: argparse.ArgumentParser) -> None:
    p.add_argument("package", help="a package folder written by npucc compile or compile-llm")
    p.add_argument("--key", required=True, help="the private key (PEM) to sign with")
    p.add_argument("--password-env", default=None, metavar="VAR",
                   help="the environment variable holding the private key's password")
    p.set_defaults(func=_cmd_sign)


def _cmd_sign(args: argparse.Namespace) -> int:
    from runtime.llm_package import is_llm_package, sign_llm_package
    from runtime.package_save import sign_package

    sign = sign_llm_package if is_llm_package(args.package) else sign_package
    sig = sign(args.package, args.key, password_from_env(args.password_env))
    print(f"signed {args.package}: {sig}", file=sys.stderr)
    return 0


def configure_verify(p: argparse.ArgumentParser) -> None:
    p.add_argument("package", help="a package folder")
    p.add_argument("--public-key", action="append", default=[], metavar="PUB",
                   help="a trusted public key (repeatable); default: NPUCC_TRUSTED_KEYS")
    p.set_defaults(func=_cmd_verify)


def _cmd_verify(args: argparse.Namespace) -> int:
    from runtime.llm_package import is_llm_package, read_verified_llm
    from runtime.package_load import read_verified

    keys = args.public_key or None
    if is_llm_package(args.package):
        manifest, blobs, mapped, signer = read_verified_llm(args.package, keys,
                                                            require_signature=True)
        blobs = {**blobs, "weights.bin": mapped}
    else:
        manifest, blobs, signer = read_verified(args.package, keys, require_signature=True)
    print(f"{args.package}: signature OK, signed by key {signer.id} ({signer.source}); "
          f"{len(blobs)} files verified (target {manifest['target']['name']}, "
          f"{manifest['target']['arch']})")
    return 0
