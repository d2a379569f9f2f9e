"""Build glue: compiles libhyzo with cargo and ships it inside the ``hyzo`` package.

``pip install ./ffi/python`` runs ``cargo build --release --lib`` in the crate at the
repository root (two levels up; override with ``HYZO_CRATE_DIR``), honouring
``CARGO_TARGET_DIR`` and ``CARGO`` and extra arguments in ``HYZO_CARGO_ARGS`` (e.g.
``--no-default-features`` for a build without CUDA), and copies ``libhyzo.so`` to
``hyzo/libhyzo.so``. ``HYZO_PREBUILT_LIBRARY`` skips cargo and copies that file instead.
The wheel is tagged for the platform (it holds a native library) but not for a Python ABI
(the library is loaded with ctypes).
"""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70.1
    from wheel.bdist_wheel import bdist_wheel  # type: ignore

HERE = Path(__file__).resolve().parent


def _crate_dir() -> Path:
    d = Path(os.environ.get("HYZO_CRATE_DIR", HERE.parent.parent)).resolve()
    if not (d / "Cargo.toml").is_file():
        sys.exit(f"hyzo: no Cargo.toml in {d}; set HYZO_CRATE_DIR to the hyzo crate, or "
                 "HYZO_PREBUILT_LIBRARY to a built libhyzo.so")
    return d


def _build_library() -> Path:
    pre = os.environ.get("HYZO_PREBUILT_LIBRARY")
    if pre:
        return Path(pre)
    crate = _crate_dir()
    cargo = os.environ.get("CARGO", "cargo")
    cmd = [cargo, "build", "--release", "--lib", "--manifest-path", str(crate / "Cargo.toml")]
    cmd += shlex.split(os.environ.get("HYZO_CARGO_ARGS", ""))
    print("hyzo: " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    target = Path(os.environ.get("CARGO_TARGET_DIR", crate / "target"))
    if not target.is_absolute():
        target = crate / target
    lib = target / "release" / "libhyzo.so"
    if not lib.is_file():
        sys.exit(f"hyzo: cargo finished but {lib} does not exist")
    return lib


class BuildPyWithCargo(build_py):
    """build_py that first builds libhyzo.so and copies it into the package."""

    def run(self) -> None:
        lib = _build_library()
        super().run()
        # Into the build tree only (what the wheel packs), never the source tree: a stale
        # copy there would shadow target/release in an uninstalled checkout.
        out = Path(self.build_lib) / "hyzo"
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(lib, out / "libhyzo.so")


class BinaryDistribution(Distribution):
    """A distribution holding a native library: built into and installed from platlib, so
    the wheel holds the package at its root (not under .data/purelib), as auditwheel and
    the wheel spec require of a platform wheel."""

    def has_ext_modules(self) -> bool:
        return True


class PlatformWheel(bdist_wheel):
    """A wheel tagged for this platform, any Python 3 (ctypes, no extension module)."""

    def get_tag(self):
        _, _, plat = super().get_tag()
        return "py3", "none", plat


setup(distclass=BinaryDistribution,
      cmdclass={"build_py": BuildPyWithCargo, "bdist_wheel": PlatformWheel})
