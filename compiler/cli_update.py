"""``npucc update make`` and ``npucc update apply``: over-the-air delta updates of packages.

    npucc update make OLD.npkg NEW.npkg -o update.npkd --key KEY
    npucc update apply INSTALLED.npkg update.npkd --trusted-key KEY.pub [--allow-downgrade]

``make`` writes a signed delta (``compiler/update.py``); ``apply`` checks its signature, that
it was made for exactly the installed package, and the version, rebuilds the new package
beside the installed one, verifies it and swaps it in atomically (``runtime/update.py``).
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["configure_update"]


def configure_update(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="update_command", metavar="ACTION", required=True)
    mk = sub.add_parser("make", help="write a signed delta from OLD to NEW",
                        description="write a signed delta that turns package OLD into NEW")
    mk.add_argument("old", help="the package installed on devices (folder)")
    mk.add_argument("new", help="the package to install (folder; signed)")
    mk.add_argument("-o", "--output", required=True, metavar="UPDATE.npkd",
                    help="the delta file to write")
    mk.add_argument("--key", default=None, metavar="KEY",
                    help="the private key to sign the delta with (npucc keygen); without it "
                    "the delta is unsigned and devices with trusted keys refuse it")
    mk.add_argument("--password-env", default=None, metavar="VAR",
                    help="the environment variable holding the key's password")
    mk.set_defaults(func=_cmd_make)
    ap = sub.add_parser("apply", help="apply a delta to an installed package, atomically",
                        description="apply a delta to an installed package: signature, base "
                        "and version checked, rebuilt beside, verified, swapped in atomically")
    ap.add_argument("installed", help="the installed package folder (replaced in place)")
    ap.add_argument("delta", help="the delta file (npucc update make)")
    ap.add_argument("--trusted-key", action="append", default=[], metavar="PUB",
                    help="a public key the delta (and the new package) must be signed with "
                    "(repeatable); default: NPUCC_TRUSTED_KEYS")
    ap.add_argument("--allow-downgrade", action="store_true",
                    help="install even if the update's version is older than the installed one")
    ap.set_defaults(func=_cmd_apply)


def _cmd_make(args: argparse.Namespace) -> int:
    from compiler.cli_trust import password_from_env
    from compiler.update import make_update

    st = make_update(args.old, args.new, args.output, args.key,
                     password=password_from_env(args.password_env))
    ops = ", ".join(f"{op} {n / 1024:.1f} KiB" for op, n in sorted(st.by_op.items())) or "none"
    print(f"wrote {st.path}: {st.delta_bytes} bytes = {100 * st.ratio:.2f}% of NEW "
          f"({st.new_package_bytes} bytes); {st.copied_bytes} bytes referenced from OLD; "
          f"payload by method: {ops}; {len(st.tensors)} changed tensors"
          f"{'' if args.key else ' (UNSIGNED: devices with trusted keys refuse it)'}")
    return 0


def _cmd_apply(args: argparse.Namespace) -> int:
    from runtime.update import apply_update

    r = apply_update(args.installed, args.delta, trusted_keys=args.trusted_key or None,
                     allow_downgrade=args.allow_downgrade)
    if not r.applied:
        print(f"{r.path} already is this update's result (version "
              f"{r.new_version or 'none'}); nothing to do", file=sys.stderr)
        return 0
    who = f"signed by key {r.signed_by.id[:16]}" if r.signed_by else "UNVERIFIED (no keys)"
    print(f"updated {r.path}: version {r.old_version or 'none'} -> {r.new_version or 'none'}, "
          f"{r.files_written} files, {r.bytes_written} bytes rebuilt in {r.seconds:.2f} s; "
          f"delta {who}")
    return 0
