#!/usr/bin/env bash
# Set up an aarch64 Python with the TVM runtime, run under qemu-user, to execute the kirin990 /
# rk3588 CPU kernel library (device/kernels.aarch64.so) on this x86 machine.
#
# What it does (TVM-NOTES "Cross-compiling and running aarch64 code here"), cached under
# ${NPUCC_QEMU_DIR:-~/.cache/npucc-qemu}; re-running skips what is there:
#   1. wheels/  aarch64 wheels of apache-tvm, apache-tvm-ffi, numpy, ml_dtypes (+ typing_extensions, safetensors: runtime/ reads weights with it)
#               (pip download --platform manylinux_2_28_aarch64, versions = the host's), unzipped
#               into site/ (the PYTHONPATH under qemu)
#   2. debs/    Debian arm64 packages of python3.11 and the libraries it needs
#               (dpkg --add-architecture arm64; apt-get download), dpkg -x into sysroot/, plus the
#               cross toolchain's /usr/aarch64-linux-gnu/lib (libc, libstdc++)
#   3. a smoke test: python3.11 under qemu-aarch64 imports tvm.runtime
# Needs: qemu-user, g++-aarch64-linux-gnu (apt-get), pip, network access to PyPI and the Debian
# mirror. Takes ~10-15 min the first time (mostly downloads). Prints the run command at the end.
#
# tests/test_aarch64_qemu.py uses the result and skips (saying why) when it is absent.
set -euo pipefail

DIR="${NPUCC_QEMU_DIR:-$HOME/.cache/npucc-qemu}"
mkdir -p "$DIR"/wheels "$DIR"/debs "$DIR"/site "$DIR"/sysroot
PY=${PYTHON:-python3}

need() { command -v "$1" >/dev/null 2>&1 || { echo "missing: $1 ($2)" >&2; exit 1; }; }
need qemu-aarch64 "apt-get install qemu-user"
need aarch64-linux-gnu-g++ "apt-get install g++-aarch64-linux-gnu"

# -- 1. aarch64 wheels, same versions as the host's packages ---------------------------------
ver() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
if [ ! -f "$DIR/site/.done" ]; then
  specs=()
  for p in apache-tvm apache-tvm-ffi numpy ml_dtypes typing_extensions safetensors; do
    specs+=("$p==$(ver "$p")")
  done
  echo "downloading aarch64 wheels: ${specs[*]}"
  # manylinux_2_28 finds apache-tvm (manylinux2014 alone does not); safetensors is 2_17 only
  "$PY" -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_28_aarch64 \
    --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 \
    --python-version 3.11 --implementation cp -d "$DIR/wheels" "${specs[@]}"
  for w in "$DIR"/wheels/*.whl; do
    "$PY" -m zipfile -e "$w" "$DIR/site"
  done
  touch "$DIR/site/.done"
fi

# -- 2. Debian arm64 python3.11 into a sysroot -----------------------------------------------
if [ ! -f "$DIR/sysroot/.done" ]; then
  if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    dpkg --add-architecture arm64
  fi
  apt-get update -qq
  pkgs=(python3.11-minimal:arm64 libpython3.11-minimal:arm64 libpython3.11-stdlib:arm64
        libffi8:arm64 libexpat1:arm64 zlib1g:arm64 libbz2-1.0:arm64 liblzma5:arm64
        libssl3:arm64 libsqlite3-0:arm64 libuuid1:arm64 libncursesw6:arm64 libtinfo6:arm64
        libreadline8:arm64 libgcc-s1:arm64 libstdc++6:arm64 libc6:arm64 libcrypt1:arm64
        libnsl2:arm64 libtirpc3:arm64 libdb5.3:arm64 libgdbm6:arm64)
  (cd "$DIR/debs" && apt-get download -q "${pkgs[@]}")
  for d in "$DIR"/debs/*.deb; do
    dpkg -x "$d" "$DIR/sysroot"
  done
  # the cross toolchain's runtime libraries (libc, libstdc++, ld-linux-aarch64)
  if [ -d /usr/aarch64-linux-gnu/lib ]; then
    mkdir -p "$DIR/sysroot/usr/aarch64-linux-gnu"
    cp -an /usr/aarch64-linux-gnu/lib "$DIR/sysroot/usr/aarch64-linux-gnu/"
  fi
  touch "$DIR/sysroot/.done"
fi

# -- 3. smoke test -----------------------------------------------------------------------------
# OPENBLAS_NUM_THREADS=1: numpy's OpenBLAS thread start-up hangs under qemu-user otherwise
RUN=(env TVM_USE_RUNTIME_LIB=1 OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 PYTHONPATH="$DIR/site"
     LD_LIBRARY_PATH="$DIR/sysroot/usr/aarch64-linux-gnu/lib:$DIR/sysroot/lib/aarch64-linux-gnu:$DIR/sysroot/usr/lib/aarch64-linux-gnu"
     qemu-aarch64 -L "$DIR/sysroot" -cpu cortex-a76 "$DIR/sysroot/usr/bin/python3.11")
"${RUN[@]}" -c "import numpy, tvm.runtime; print('aarch64 python ok: numpy', numpy.__version__)"
echo "ok" > "$DIR/READY"
echo "run aarch64 python with:"
printf ' %q' "${RUN[@]}"
echo
