"""Package signatures: OpenSSF model-signing (OMS) format, key-based, verified with ``cryptography``.

A signed package has one more file, ``model.sig``: a Sigstore bundle (media type
``application/vnd.dev.sigstore.bundle.v0.3+json``) holding a DSSE envelope whose payload is an
in-toto statement (predicate ``https://model_signing/signature/v1.0``) that lists the sha256 of
*every* other file of the package — ``manifest.json`` (which itself lists every file's sha256
and size), ``kernels.so``, ``weights.safetensors`` and any extra file. The envelope is signed
with an ECDSA key (P-256, P-384 or P-521, PEM), exactly as ``model_signing sign key`` does, so
``model_signing verify key PKG --signature PKG/model.sig --public_key KEY.pub`` accepts an npucc
package and this module accepts a package signed by ``model_signing``'s key method.

Why not call the ``model-signing`` package at runtime: it pulls in sigstore, tuf, pydantic and a
dozen more packages for its keyless flows, too much for the runtime of a deployed package; the
key-based format is small and specified, so the runtime writes and checks it with
``cryptography`` alone. The tests check both directions against ``model_signing`` itself.

Trust: :func:`trusted_keys` resolves what ``runtime.load(..., trusted_keys=...)`` was given, or
else ``NPUCC_TRUSTED_KEYS`` (PEM files or folders of ``*.pub``, separated by ``os.pathsep``), or
else the per-user folder ``~/.config/npucc/trusted_keys`` (``$XDG_CONFIG_HOME``) if it exists.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SignatureError

__all__ = ["SIGNATURE_FILE", "TRUSTED_KEYS_ENV", "PublicKey", "config_keys_dir", "generate_key",
           "load_private_key", "load_public_key", "trusted_keys", "signature_bytes",
           "verify_signature", "key_id"]

SIGNATURE_FILE = "model.sig"
TRUSTED_KEYS_ENV = "NPUCC_TRUSTED_KEYS"
MAX_SIGNATURE_BYTES = 1 << 20
MAX_SIGNED_FILES = 4096

_BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
_PAYLOAD_TYPE = "application/vnd.in-toto+json"
_STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
_PREDICATE_TYPE = "https://model_signing/signature/v1.0"
# model_signing's own default ignore list plus our signature file: a verifier re-hashes the
# folder minus these paths
_IGNORE_PATHS = [SIGNATURE_FILE, ".git", ".gitattributes", ".github", ".gitignore"]
_CURVES = {"secp256r1": "sha256", "secp384r1": "sha384", "secp521r1": "sha512"}


@dataclass(frozen=True)
class PublicKey:
    """A trusted public key: the ``cryptography`` key, its PEM and where it came from."""

    key: Any
    pem: bytes
    source: str

    @property
    def id(self) -> str:
        return key_id(self.pem)


def key_id(public_pem: bytes) -> str:
    """The key's identifier as model_signing records it: sha256 (hex) of its PEM."""
    return hashlib.sha256(public_pem).hexdigest()


def _crypto():
    try:
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
    except ImportError as e:  # pragma: no cover - cryptography is a dependency
        raise SignatureError(f"signatures need the 'cryptography' package: {e}") from e
    return hashes, serialization, ec


def _hash_for(key: Any) -> Any:
    hashes, _, ec = _crypto()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in _CURVES:
        raise SignatureError(f"unsupported key type {type(key).__name__}"
                             f"{' ' + key.curve.name if hasattr(key, 'curve') else ''}: npucc "
                             f"(like model_signing's key method) signs with ECDSA P-256/384/521")
    return {"sha256": hashes.SHA256, "sha384": hashes.SHA384,
            "sha512": hashes.SHA512}[_CURVES[key.curve.name]]()


def _public_pem(key: Any) -> bytes:
    _, serialization, _ = _crypto()
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def generate_key(private_path: str | os.PathLike, public_path: str | os.PathLike | None = None,
                 password: bytes | None = None) -> tuple[Path, Path]:
    """Write a new ECDSA P-256 key pair: the private key (PEM PKCS#8, mode 0600, encrypted
    when ``password`` is given) and the public key (``<private>.pub`` unless named).
    Refuses to overwrite either file."""
    _, serialization, ec = _crypto()
    private_path = Path(private_path)
    public_path = Path(public_path) if public_path else private_path.with_name(
        private_path.name.removesuffix(".key").removesuffix(".pem") + ".pub")
    for path in (private_path, public_path):
        if os.path.lexists(path):
            raise SignatureError(f"{path} exists; refusing to overwrite a key file")
    key = ec.generate_private_key(ec.SECP256R1())
    enc = (serialization.BestAvailableEncryption(password) if password
           else serialization.NoEncryption())
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
    for path, data, mode in ((private_path, priv, 0o600),
                             (public_path, _public_pem(key.public_key()), 0o644)):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        except FileExistsError:
            raise SignatureError(f"{path} exists; refusing to overwrite a key file") from None
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    return private_path, public_path


def load_private_key(key: Any, password: bytes | None = None) -> Any:
    """A private key from a PEM path, PEM bytes, or a ``cryptography`` key object."""
    _, serialization, ec = _crypto()
    if isinstance(key, ec.EllipticCurvePrivateKey):
        priv = key
    else:
        pem = key if isinstance(key, bytes) else _read_small(Path(key), "private key")
        try:
            priv = serialization.load_pem_private_key(pem, password)
        except (ValueError, TypeError) as e:
            raise SignatureError(f"cannot read the private key {_name(key)}: {e}") from None
    _hash_for(priv.public_key())
    return priv


def load_public_key(key: Any) -> PublicKey:
    """A public key from a PEM path, PEM bytes, a ``cryptography`` key or a PublicKey."""
    if isinstance(key, PublicKey):
        return key
    _, serialization, ec = _crypto()
    if isinstance(key, ec.EllipticCurvePublicKey):
        _hash_for(key)
        return PublicKey(key, _public_pem(key), "<key object>")
    pem = key if isinstance(key, bytes) else _read_small(Path(key), "public key")
    try:
        pub = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as e:
        raise SignatureError(f"cannot read the public key {_name(key)}: {e}") from None
    _hash_for(pub)
    # the id is over the canonical PEM, as model_signing computes it
    return PublicKey(pub, _public_pem(pub), _name(key))


def config_keys_dir() -> Path:
    """The per-user trust root folder: ``$XDG_CONFIG_HOME/npucc/trusted_keys`` (default
    ``~/.config/npucc/trusted_keys``); its ``*.pub`` files are trusted keys."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "npucc" / "trusted_keys"


def trusted_keys(keys: Iterable[Any] | None = None) -> list[PublicKey]:
    """The trust root: ``keys`` if given, else the keys ``NPUCC_TRUSTED_KEYS`` names (files, or
    folders whose ``*.pub`` / ``*.pem`` files are keys), else those in :func:`config_keys_dir`;
    empty when none is set."""
    if keys is None:
        spec = os.environ.get(TRUSTED_KEYS_ENV, "")
        if not spec.strip() and config_keys_dir().is_dir():
            spec = str(config_keys_dir())
        keys = []
        for part in filter(None, spec.split(os.pathsep)):
            p = Path(part)
            if p.is_dir():
                keys += sorted(q for q in p.iterdir() if q.suffix in (".pub", ".pem"))
            else:
                keys.append(p)
        if spec.strip() and not keys:
            raise SignatureError(f"{TRUSTED_KEYS_ENV}={spec!r} names no key file")
    elif isinstance(keys, (str, bytes, os.PathLike)):
        keys = [keys]
    return [load_public_key(k) for k in keys]


def _pae(payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding of ``payload`` (what the signature covers)."""
    return b"DSSEv1 %d %s %d %s" % (len(_PAYLOAD_TYPE), _PAYLOAD_TYPE.encode(), len(payload),
                                    payload)


def signature_bytes(digests: Mapping[str, str], private_key: Any, model_name: str) -> bytes:
    """``model.sig`` for a package whose files (every one but model.sig) have these sha256
    digests (hex), signed with ``private_key`` (see :func:`load_private_key`)."""
    _, _, ec = _crypto()
    priv = load_private_key(private_key)
    names = sorted(digests)
    root = hashlib.sha256(b"".join(bytes.fromhex(digests[n]) for n in names)).hexdigest()
    statement = {
        "_type": _STATEMENT_TYPE,
        "subject": [{"name": model_name, "digest": {"sha256": root}}],
        "predicateType": _PREDICATE_TYPE,
        "predicate": {
            "serialization": {"method": "files", "hash_type": "sha256", "allow_symlinks": False,
                              "ignore_paths": list(_IGNORE_PATHS)},
            "resources": [{"name": n, "algorithm": "sha256", "digest": digests[n]}
                          for n in names],
        },
    }
    payload = json.dumps(statement, indent=2).encode()
    pub = priv.public_key()
    sig = priv.sign(_pae(payload), ec.ECDSA(_hash_for(pub)))
    bundle = {
        "mediaType": _BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {"publicKey": {"hint": key_id(_public_pem(pub))},
                                 "tlogEntries": []},
        "dsseEnvelope": {"payload": base64.b64encode(payload).decode(),
                         "payloadType": _PAYLOAD_TYPE,
                         "signatures": [{"sig": base64.b64encode(sig).decode(), "keyid": ""}]},
    }
    return (json.dumps(bundle, indent=2) + "\n").encode()


def verify_signature(sig: bytes, digests: Mapping[str, str], keys: Iterable[PublicKey],
                     where: str) -> PublicKey:
    """Check ``model.sig`` against the trusted ``keys`` and the package's actual files.

    ``digests``: sha256 (hex) of every file in the package but model.sig, computed from the
    bytes that will be used. Returns the key that signed. Raises :class:`SignatureError` when
    the bundle is malformed, signed by no trusted key, or lists other files or digests than
    ``digests`` (a file added, removed or changed after signing).
    """
    from cryptography.exceptions import InvalidSignature

    _, _, ec = _crypto()
    keys = list(keys)
    envelope, hint = _parse_bundle(sig, where)
    payload = envelope["payload"]
    signers = [k for k in keys if hint is None or k.id == hint] or []
    if not signers:
        raise SignatureError(f"{where}: signed by key {hint}, which is not a trusted key "
                             f"(trusted: {', '.join(k.id[:16] for k in keys) or 'none'})")
    signer = None
    for k in signers:
        for s in envelope["signatures"]:
            try:
                k.key.verify(s, _pae(payload), ec.ECDSA(_hash_for(k.key)))
            except InvalidSignature:
                continue
            signer = k
            break
        if signer:
            break
    if signer is None:
        raise SignatureError(f"{where}: the signature does not verify with any trusted key "
                             f"(tampered, or signed by another key)")
    signed = _signed_digests(payload, where)
    if signed != dict(digests):
        extra = sorted(set(digests) - set(signed))
        missing = sorted(set(signed) - set(digests))
        changed = sorted(n for n in set(signed) & set(digests) if signed[n] != digests[n])
        raise SignatureError(f"{where}: files differ from what was signed: "
                             f"changed {changed}, not signed {extra}, missing {missing}")
    return signer


def _parse_bundle(sig: bytes, where: str) -> tuple[dict[str, Any], str | None]:
    """The DSSE envelope (payload and signatures decoded) and the key hint of a bundle."""
    def bad(why: str) -> SignatureError:
        return SignatureError(f"{where}: {SIGNATURE_FILE} is not a valid signature bundle: {why}")

    if len(sig) > MAX_SIGNATURE_BYTES:
        raise bad(f"{len(sig)} bytes, over the limit of {MAX_SIGNATURE_BYTES}")
    try:
        b = json.loads(sig)
    except (ValueError, RecursionError) as e:
        raise bad(f"not JSON ({e})") from None
    try:
        if b["mediaType"] != _BUNDLE_MEDIA_TYPE:
            raise bad(f"media type {b['mediaType']!r}, expected {_BUNDLE_MEDIA_TYPE!r}")
        env = b["dsseEnvelope"]
        if env["payloadType"] != _PAYLOAD_TYPE:
            raise bad(f"payload type {env['payloadType']!r}")
        hint = (b.get("verificationMaterial") or {}).get("publicKey", {}).get("hint")
        if hint is not None and not isinstance(hint, str):
            raise bad("the key hint is not a string")
        sigs = [base64.b64decode(s["sig"], validate=True) for s in env["signatures"][:8]]
        payload = base64.b64decode(env["payload"], validate=True)
    except SignatureError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise bad(f"{type(e).__name__}: {e}") from None
    if not sigs:
        raise bad("no signature in the envelope")
    return {"payload": payload, "signatures": sigs}, hint


def _signed_digests(payload: bytes, where: str) -> dict[str, str]:
    """name -> sha256 of the resources of a verified in-toto statement (OMS v1.0)."""
    def bad(why: str) -> SignatureError:
        return SignatureError(f"{where}: the signed statement is not usable: {why}")

    try:
        st = json.loads(payload)
        if st["_type"] != _STATEMENT_TYPE or st["predicateType"] != _PREDICATE_TYPE:
            raise bad(f"statement {st['_type']!r} / predicate {st['predicateType']!r}")
        ser = st["predicate"]["serialization"]
        if ser.get("method") != "files" or ser.get("hash_type") != "sha256":
            raise bad(f"serialization {ser!r}; expected method 'files' with sha256")
        res = st["predicate"]["resources"]
        if not isinstance(res, list) or len(res) > MAX_SIGNED_FILES:
            raise bad("resources is not a list of at most "
                      f"{MAX_SIGNED_FILES} files")
        out: dict[str, str] = {}
        for r in res:
            if r["algorithm"] != "sha256" or not isinstance(r["name"], str):
                raise bad(f"resource {r!r}")
            out[r["name"]] = str(r["digest"]).lower()
        root = hashlib.sha256(b"".join(bytes.fromhex(out[n]) for n in sorted(out))).hexdigest()
        subject = st["subject"]
        if len(subject) != 1 or subject[0]["digest"]["sha256"] != root:
            raise bad("the subject digest does not match the resources")
    except SignatureError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError, RecursionError) as e:
        raise bad(f"{type(e).__name__}: {e}") from None
    return out


def _read_small(path: Path, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 16)
    except OSError as e:
        raise SignatureError(f"cannot read the {what} {path}: {e}") from None
    return data


def _name(key: Any) -> str:
    return "<PEM bytes>" if isinstance(key, bytes) else str(key)

