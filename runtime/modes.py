"""Several plans of one model in one package ("modes": e.g. ``performance`` and ``accuracy``).

Layout: the package is an ordinary package of its **default** mode — ``manifest.json``'s
plan, ``kernels.so`` and ``weights.safetensors`` — so a runtime that knows nothing of modes
loads and runs the default. The other modes' kernel libraries are extra files
(``modes/<mode>.kernels.so``, and ``modes/<mode>.<name>`` for their other extra files, e.g.
the device library), and the manifest gains::

    modes: {default: "performance",
            order: ["performance", "accuracy"],
            plans: {performance: {library: "kernels.so", extra_files: {...}, report: {...}},
                    accuracy:    {library: "modes/accuracy.kernels.so",
                                  extra_files: {"device/kernels.aarch64.so":
                                                "modes/accuracy.kernels.aarch64.so"},
                                  target, steps, tensors, memory,     (that mode's plan)
                                  report: {...}}}}

A mode's plan is the top-level manifest with the plan's keys replacing its own (the default
mode's plan has none: it *is* the top level). Every weight of every mode is in the one
``weights.safetensors``; a tensor whose bytes (dtype, shape and content: sha256) are equal
in two modes is stored once, under the default mode's key (or the first mode's that has it);
the others' tensor tables point at it. Keys only a non-default mode has are stored as
``<mode>/<key>``. ``report`` is what the compiler knew (estimate, NPU/CPU split) — optional,
informative, read by ``npucc monitor``.

Everything is in the manifest's file list, so signing, verification and loading are the
ordinary ones (``package_load.py``); :func:`mode_packages` then checks each non-default
mode's plan as strictly as ``Package.load`` checks the top level (schema, architecture and
ISA, plan consistency, kernel exports) before any of its code is loaded.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import PackageError
from .package import LIBRARY, SUPPORTED_FORMAT_VERSIONS, WEIGHTS, Package
from .package_io import SealedLibrary

__all__ = ["MODES_KEY", "PLAN_KEYS", "MODE_NAME", "has_modes", "mode_names", "default_mode",
           "merge_packages", "mode_packages", "mode_manifest", "mode_report", "check_mode_name"]

MODES_KEY = "modes"
PLAN_KEYS = ("target", "steps", "tensors", "memory")
MODE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
MODE_DIR = "modes"


def check_mode_name(name: Any) -> str:
    if not isinstance(name, str) or not MODE_NAME.fullmatch(name):
        raise PackageError(f"mode name {name!r} is not valid: a letter, then up to 63 letters, "
                           f"digits, '_' or '-'")
    return name


def has_modes(manifest: Mapping[str, Any]) -> bool:
    return isinstance(manifest.get(MODES_KEY), Mapping)


def _section(manifest: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    """The ``modes`` section, checked for shape (it is untrusted input)."""
    sec = manifest.get(MODES_KEY)
    if not isinstance(sec, Mapping):
        raise PackageError(f"{where}: the package has no modes")
    order, plans, default = sec.get("order"), sec.get("plans"), sec.get("default")
    if not isinstance(order, list) or not order or len(order) > 64:
        raise PackageError(f"{where}: modes.order must be a list of 1 to 64 mode names")
    if not isinstance(plans, Mapping) or set(plans) != set(order) or len(set(order)) != len(
            order):
        raise PackageError(f"{where}: modes.plans must have exactly the modes of modes.order "
                           f"({order!r}), once each")
    if default not in order:
        raise PackageError(f"{where}: modes.default {default!r} is not one of {order}")
    for name in order:
        check_mode_name(name)
        plan = plans[name]
        if not isinstance(plan, Mapping) or not isinstance(plan.get("library"), str):
            raise PackageError(f"{where}: modes.plans.{name} must name its kernel library")
        extra = plan.get("extra_files", {})
        if not isinstance(extra, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
            raise PackageError(f"{where}: modes.plans.{name}.extra_files must map names to "
                               f"file names")
        if name != default and any(k not in plan for k in PLAN_KEYS):
            raise PackageError(f"{where}: modes.plans.{name} lacks its plan "
                               f"({', '.join(PLAN_KEYS)})")
    if plans[default].get("library") != LIBRARY or any(k in plans[default] for k in PLAN_KEYS):
        raise PackageError(f"{where}: the default mode {default!r} must be the package's own "
                           f"plan ({LIBRARY} and the top-level steps)")
    return sec


def mode_names(manifest: Mapping[str, Any]) -> list[str]:
    return list(_section(manifest, "package")["order"])


def default_mode(manifest: Mapping[str, Any]) -> str:
    return str(_section(manifest, "package")["default"])


def mode_report(manifest: Mapping[str, Any], mode: str) -> dict[str, Any]:
    """What the compiler recorded about ``mode`` (estimate, NPU/CPU split), or ``{}``."""
    rep = _section(manifest, "package")["plans"][mode].get("report")
    return dict(rep) if isinstance(rep, Mapping) else {}


def mode_manifest(manifest: Mapping[str, Any], mode: str) -> dict[str, Any]:
    """The manifest of one mode as an ordinary single-plan manifest: the top level with that
    mode's plan keys, ``files`` naming its own library as ``kernels.so``."""
    sec = _section(manifest, "package")
    if mode not in sec["plans"]:
        raise PackageError(f"no mode {mode!r} in the package; its modes are {sec['order']}")
    plan = sec["plans"][mode]
    sub = {k: v for k, v in manifest.items() if k != MODES_KEY}
    sub.update({k: plan[k] for k in PLAN_KEYS if k in plan})
    files = dict(manifest["files"])
    lib = plan["library"]
    if files and (lib not in files or WEIGHTS not in files):
        raise PackageError(f"mode {mode!r}: its library {lib} is not among the package's files")
    # (an in-memory merged package lists no files yet; they are hashed when it is saved)
    sub["files"] = {LIBRARY: files[lib], WEIGHTS: files[WEIGHTS]} if files else {}
    return sub


def _content_key(arr: np.ndarray) -> str:
    a = np.ascontiguousarray(arr)
    h = hashlib.sha256(f"{a.dtype.str}|{a.shape}|".encode())
    h.update(a.reshape(-1).view(np.uint8).data)
    return h.hexdigest()


def _package_bytes(pkg: Package) -> tuple[bytes, dict[str, bytes]]:
    """(kernel library bytes, extra files' bytes) of a built or loaded package."""
    files = pkg.file_bytes()
    files.pop(WEIGHTS, None)
    return files.pop(LIBRARY), files


def merge_packages(packages: Mapping[str, Package], default: str | None = None,
                   reports: Mapping[str, Mapping[str, Any]] | None = None) -> Package:
    """One package holding every mode's plan (see the module docstring); ``default``: the mode
    a plain ``runtime.load`` runs (default: the first). The packages must take the same
    inputs and give the same outputs (names, shapes, dtypes) and be for one architecture."""
    if not packages:
        raise PackageError("merge_packages: no modes given")
    names = [check_mode_name(n) for n in packages]
    default = default or names[0]
    if default not in packages:
        raise PackageError(f"default mode {default!r} is not one of the modes {names}")
    order = [default, *[n for n in names if n != default]]
    base = packages[default].manifest
    for name in order[1:]:
        m = packages[name].manifest
        for key in ("inputs", "outputs"):
            if m[key] != base[key]:
                raise PackageError(f"mode {name!r} has {key} {m[key]}; mode {default!r} has "
                                   f"{base[key]}: modes of one package must have the same "
                                   f"interface")
        if m["target"].get("arch") != base["target"].get("arch"):
            raise PackageError(f"mode {name!r} is built for {m['target'].get('arch')}, mode "
                               f"{default!r} for {base['target'].get('arch')}")
    weights: dict[str, np.ndarray] = {}
    by_content: dict[str, str] = {}
    files: dict[str, bytes] = {}
    plans: dict[str, dict[str, Any]] = {}
    keymaps: dict[str, dict[str, str]] = {}
    library = b""
    for name in order:
        pkg = packages[name]
        lib, extras = _package_bytes(pkg)
        keymap = keymaps[name] = {}
        for key, arr in pkg.weights().items():
            ck = _content_key(arr)
            if ck not in by_content:
                stored = key if name == default else f"{name}/{key}"
                while stored in weights:
                    stored += "_"
                weights[stored] = arr
                by_content[ck] = stored
            keymap[key] = by_content[ck]
        plan: dict[str, Any] = {}
        if name == default:
            library = lib
            plan["library"] = LIBRARY
            plan["extra_files"] = {n: n for n in extras}
            files.update(extras)
        else:
            plan["library"] = f"{MODE_DIR}/{name}.{LIBRARY}"
            files[plan["library"]] = lib
            plan["extra_files"] = {}
            for n, data in extras.items():
                stored = f"{MODE_DIR}/{name}.{n.rsplit('/', 1)[-1]}"
                plan["extra_files"][n] = stored
                files[stored] = data
            m = pkg.manifest
            plan["target"] = m["target"]
            plan["steps"] = m["steps"]
            plan["memory"] = m["memory"]
            plan["tensors"] = [dict(t, weight=keymap[t["weight"]]) if t.get("weight") else t
                               for t in m["tensors"]]
        if reports and name in reports:
            plan["report"] = dict(reports[name])
        plans[name] = plan
    manifest = {k: v for k, v in base.items() if k not in ("files", "weight_encoding")}
    manifest["tensors"] = [dict(t, weight=keymaps[default][t["weight"]]) if t.get("weight")
                           else t for t in base["tensors"]]
    manifest[MODES_KEY] = {"default": default, "order": order, "plans": plans}
    manifest["files"] = {}
    merged = Package(manifest, LIBRARY, weights, extra_files=files,
                     library=SealedLibrary(library))
    merged.sparse_weights = any(p.sparse_weights for p in packages.values())
    return merged


def mode_packages(pkg: Package, where: str | None = None) -> dict[str, Package]:
    """Each mode of a (loaded or merged) package as its own :class:`Package`, in mode order.

    The default mode is ``pkg`` itself (already checked by ``Package.load``). Every other
    mode's plan is checked like a package's before its library is used: manifest schema and
    limits, ELF architecture and instruction set, plan consistency, kernel exports."""
    from ._verify import check_arch, check_manifest
    from .manifest_schema import validate_manifest
    from .package_load import check_exports

    where = where or str(pkg.directory or "package")
    sec = _section(pkg.manifest, where)
    out: dict[str, Package] = {}
    weights: Any = pkg.weights_file_bytes() if pkg.directory is not None else pkg.weights()
    for name in sec["order"]:
        if name == sec["default"]:
            out[name] = pkg
            continue
        plan = sec["plans"][name]
        sub = mode_manifest(pkg.manifest, name)
        validate_manifest(sub, f"{where} (mode {name})", SUPPORTED_FORMAT_VERSIONS)
        blob = pkg.extra_files.get(plan["library"])
        if blob is None:
            raise PackageError(f"{where}: mode {name!r}: no file {plan['library']}")
        data = blob if isinstance(blob, bytes) else blob.read_bytes()
        library = SealedLibrary(data)
        try:
            check_arch(library.path, sub, where=f"{where}/{plan['library']}")
            check_manifest(sub, where=f"{where} (mode {name})")
            check_exports(data, sub, f"{where} (mode {name})")
        except BaseException:
            library.close()
            raise
        extra = {}
        for orig, stored in plan.get("extra_files", {}).items():
            if stored not in pkg.extra_files:
                raise PackageError(f"{where}: mode {name!r}: no file {stored}")
            extra[orig] = pkg.extra_files[stored]
        mp = Package(sub, pkg.lib_path, weights, directory=pkg.directory, extra_files=extra,
                     library=library)
        mp.signed_by = pkg.signed_by
        out[name] = mp
    return out
