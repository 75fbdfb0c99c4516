"""Install detectron2 into the current interpreter, reproducibly and verifiably.

detectron2 is not published on PyPI under its own name. The default source is the PyPI package
``sal-detectron2==0.7.2`` (upstream detectron2 at commit a59f0563 plus two one-line changes),
which ships a single pure-Python ``cp310-none-any`` wheel. We download that exact file, check its
sha256 and refuse to install it on any mismatch, rename it to a ``py3-none-any`` wheel so that
pip accepts it on any Python 3, and install it with ``--no-deps`` (its metadata asks for
``numpy<2``, which is not needed). Its bundled ``_C`` extension is built for Python 3.10 and is
never loaded by convmae_det (ROIAlign and NMS come from torchvision), so it is removed.

``--source`` accepts any other pip requirement instead, e.g. upstream from git:
``python scripts/install_detectron2.py --source git+https://github.com/facebookresearch/detectron2.git``
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

WHEEL_NAME = "sal_detectron2-0.7.2-cp310-none-any.whl"
WHEEL_SHA256 = "491af0c7f79bdb2d178e46f6cb16a97c4ac968d45c41ea3f6b6435d59bbee561"
WHEEL_VERSION = "0.7.2"


class ChecksumError(RuntimeError):
    """The downloaded file is not the one this project was verified with."""


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: str, expected: str = WHEEL_SHA256) -> None:
    """Raise :class:`ChecksumError` unless ``path`` has the sha256 ``expected``."""
    found = sha256_of(path)
    if found != expected:
        raise ChecksumError(
            f"{path}: sha256 is {found}, expected {expected}. Refusing to install a detectron2 "
            "wheel that differs from the verified one; delete the file and retry, or choose "
            "another source with DETECTRON2_SOURCE=..."
        )


def _pip(*args: str) -> None:
    subprocess.check_call([sys.executable, "-m", "pip", "--disable-pip-version-check", *args])


def _installed_version() -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return None
    for dist in ("sal-detectron2", "detectron2"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def _remove_dead_extension() -> None:
    import importlib.util

    spec = importlib.util.find_spec("detectron2")
    if spec is None or not spec.submodule_search_locations:
        return
    for path in glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.so")):
        if "cpython-310" in os.path.basename(path) and sys.version_info[:2] != (3, 10):
            os.remove(path)


def install_verified_wheel(download_dir: str | None = None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        dest = download_dir or tmp
        path = os.path.join(dest, WHEEL_NAME)
        if not os.path.exists(path):
            _pip(
                "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.10",
                "--implementation", "cp", "--abi", "none", "--platform", "any",
                f"sal-detectron2=={WHEEL_VERSION}", "-d", dest,
            )  # fmt: skip
        verify_sha256(path)
        renamed = os.path.join(tmp, "sal_detectron2-0.7.2-py3-none-any.whl")
        shutil.copyfile(path, renamed)
        _pip("install", "-q", "--no-deps", "--force-reinstall", renamed)
    _remove_dead_extension()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="wheel", help="'wheel' (default) or a pip requirement")
    parser.add_argument("--download-dir", default=None, help="reuse/keep the downloaded wheel here")
    parser.add_argument("--force", action="store_true", help="reinstall even if present")
    args = parser.parse_args(argv)

    have = _installed_version()
    if args.source == "wheel":
        if have == WHEEL_VERSION and not args.force:
            return 0
        print(f"[install] detectron2 from sal-detectron2=={WHEEL_VERSION} (sha256 verified)")
        try:
            install_verified_wheel(args.download_dir)
        except ChecksumError as exc:
            print(f"[install] ERROR: {exc}", file=sys.stderr)
            return 1
    else:
        if have is not None and not args.force:
            return 0
        print(f"[install] detectron2 from {args.source}")
        _pip("install", "-q", "--no-build-isolation", args.source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
