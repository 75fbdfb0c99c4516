#!/usr/bin/env python
"""Wheels for a GPU machine without network: prepare them here, install them there.

The GPU machine's image already has torch (CUDA build), torchvision, timm, opencv, numpy, pillow,
pyyaml and matplotlib, but not detectron2 nor its small dependencies. ``prepare`` fills a folder
(``wheels/`` by default, ignored by git and carried to the GPU machine with the working tree)
with exactly those, for several Python versions; ``install`` installs the missing ones from that
folder alone (``pip --no-index``) into a separate target folder that is put on ``PYTHONPATH``.
torch and everything else of the image is never touched.

    python scripts/gpu_wheels.py prepare --dest wheels                 # here, with network
    python scripts/gpu_wheels.py prepare --dest wheels --dry-run       # what would be fetched
    python scripts/gpu_wheels.py install --wheels wheels --target /tmp/site   # there, offline
    export PYTHONPATH=/tmp/site:$PYTHONPATH
    python scripts/gpu_wheels.py check          # exit 0 when everything can be imported

What goes in (versions: the ones ``make install`` tested, see ``requirements.txt``):

* detectron2: the verified ``sal-detectron2`` wheel of ``scripts/install_detectron2.py``
  (sha256 checked), stored as ``py3-none-any`` so pip takes it on any Python 3;
* pure-Python packages (one ``py3-none-any`` wheel each, built with ``pip wheel`` where PyPI has
  only a source archive: fvcore, antlr4-python3-runtime);
* compiled packages (pycocotools, faster-coco-eval, shapely): one wheel per ``--python-version``
  (manylinux, x86-64). shapely is optional: it is only used by the training mappers.

``prepare`` ends by checking that pip resolves every pin from the folder alone, offline, for each
Python version, and that the folder stays under ``--max-mib``; it writes ``manifest.json`` (pins,
files, sha256) that ``install`` verifies before installing anything.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DEST = os.path.join(ROOT, "wheels")
DEFAULT_PYTHON_VERSIONS = ("3.10", "3.11", "3.12", "3.13")
# manylinux tags of the compiled wheels; pip matches each tag exactly, so list the usual ones
PLATFORMS = (
    "manylinux_2_35_x86_64",
    "manylinux_2_34_x86_64",
    "manylinux_2_31_x86_64",
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
)
MANIFEST = "manifest.json"
DETECTRON2 = "sal-detectron2"


@dataclass(frozen=True)
class Pin:
    """One package of the folder: ``name==version``; ``compiled``: one wheel per Python version;
    ``optional``: a version without a wheel is skipped with a warning instead of failing."""

    name: str
    version: str
    compiled: bool = False
    optional: bool = False

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


# What the GPU image lacks for tools/benchmark.py and convmae_det (plus a few small pure-Python
# packages that images usually have, installed only where missing).
PINS: tuple = (
    Pin("fvcore", "0.1.5.post20221221"),
    Pin("iopath", "0.1.9"),
    Pin("omegaconf", "2.3.1"),
    Pin("antlr4-python3-runtime", "4.9.3"),
    Pin("hydra-core", "1.3.8"),
    Pin("yacs", "0.1.8"),
    Pin("termcolor", "3.3.0"),
    Pin("portalocker", "4.4.2"),
    Pin("tabulate", "0.10.0"),
    Pin("tqdm", "4.70.1"),
    Pin("cloudpickle", "3.1.3"),
    Pin("pycocotools", "2.0.11", compiled=True),
    Pin("faster-coco-eval", "1.8.0", compiled=True),
    Pin("shapely", "2.2.0", compiled=True, optional=True),
)

# modules that must import after ``install`` (``python -c "import ..."``)
REQUIRED_MODULES = (
    "detectron2",
    "fvcore",
    "iopath",
    "omegaconf",
    "hydra",
    "yacs",
    "termcolor",
    "pycocotools",
    "faster_coco_eval",
)


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _load_detectron2_installer():
    path = os.path.join(ROOT, "scripts", "install_detectron2.py")
    spec = importlib.util.spec_from_file_location("install_detectron2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sha256_of(path: str) -> str:
    """sha256 hex digest of a file (the detectron2 installer's, so both check files alike)."""
    return _load_detectron2_installer().sha256_of(path)


def wheel_tags(filename: str) -> Dict[str, str]:
    """Name, version and tags of a wheel file name (PEP 427; build tags are not used here)."""
    parts = os.path.basename(filename)[: -len(".whl")].split("-")
    if len(parts) not in (5, 6):
        raise ValueError(f"{filename}: not a wheel file name")
    return {
        "name": _normalize(parts[0]),
        "version": parts[1],
        "python": parts[-3],
        "abi": parts[-2],
        "platform": parts[-1],
    }


def _pip(*args: str, quiet: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    if quiet:
        cmd.insert(4, "-q")
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _pip_output(proc: subprocess.CompletedProcess) -> str:
    # machines with local mirrors print one warning per missing mirror folder
    lines = [ln for ln in proc.stdout.splitlines() if not ln.startswith("WARNING: Location")]
    return "\n".join(lines[-15:])


def _platform_args(python_version: str) -> List[str]:
    args = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp"]
    for platform in PLATFORMS:
        args += ["--platform", platform]
    return args


def plan(python_versions: Sequence[str]) -> List[Dict[str, str]]:
    """What ``prepare`` fetches: one entry per wheel to download or build, with the pip
    command (without the destination)."""
    d2 = _load_detectron2_installer()
    steps = [
        {
            "package": f"{DETECTRON2}=={d2.WHEEL_VERSION}",
            "python": "any",
            "how": f"download {d2.WHEEL_NAME}, check sha256 {d2.WHEEL_SHA256[:12]}..., store as "
            f"sal_detectron2-{d2.WHEEL_VERSION}-py3-none-any.whl",
        }
    ]
    for pin in PINS:
        if not pin.compiled:
            steps.append(
                {
                    "package": pin.requirement,
                    "python": "any",
                    "how": f"pip wheel --no-deps {pin.requirement} (must give py3-none-any)",
                }
            )
            continue
        for version in python_versions:
            steps.append(
                {
                    "package": pin.requirement,
                    "python": version,
                    "how": "pip download --no-deps "
                    + " ".join(_platform_args(version))
                    + f" {pin.requirement}"
                    + (" (optional)" if pin.optional else ""),
                }
            )
    return steps


def _check_tested_versions() -> None:
    """Warn where this interpreter (normally .venv, the tested environment) has another version
    than the pins."""
    from importlib.metadata import PackageNotFoundError, version

    for pin in PINS:
        try:
            have = version(pin.name)
        except PackageNotFoundError:
            continue
        if have != pin.version:
            print(
                f"[wheels] note: {pin.name} {have} is installed here, the pin is {pin.version}",
                file=sys.stderr,
            )


def _fetch_detectron2(dest: str) -> str:
    d2 = _load_detectron2_installer()
    target = os.path.join(dest, f"sal_detectron2-{d2.WHEEL_VERSION}-py3-none-any.whl")
    if os.path.exists(target) and sha256_of(target) == d2.WHEEL_SHA256:
        return target
    with tempfile.TemporaryDirectory() as tmp:
        proc = _pip(
            "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.10",
            "--implementation", "cp", "--abi", "none", "--platform", "any",
            f"{DETECTRON2}=={d2.WHEEL_VERSION}", "-d", tmp,
        )  # fmt: skip
        path = os.path.join(tmp, d2.WHEEL_NAME)
        if proc.returncode != 0 or not os.path.exists(path):
            raise RuntimeError(f"download of {DETECTRON2} failed:\n{_pip_output(proc)}")
        d2.verify_sha256(path)  # raises ChecksumError
        shutil.copyfile(path, target)
    return target


def _fetch_pure(pin: Pin, dest: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        proc = _pip("wheel", "--no-deps", pin.requirement, "-w", tmp)
        found = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if proc.returncode != 0 or len(found) != 1:
            raise RuntimeError(f"pip wheel {pin.requirement} failed:\n{_pip_output(proc)}")
        tags = wheel_tags(found[0])
        if tags["abi"] != "none" or tags["platform"] != "any":
            raise RuntimeError(f"{found[0]}: expected a pure-Python (none-any) wheel")
        target = os.path.join(dest, found[0])
        shutil.copyfile(os.path.join(tmp, found[0]), target)
    return target


def _fetch_compiled(pin: Pin, python_version: str, dest: str) -> Optional[str]:
    with tempfile.TemporaryDirectory() as tmp:
        proc = _pip(
            "download", "--no-deps", *_platform_args(python_version), pin.requirement, "-d", tmp
        )
        found = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if proc.returncode != 0 or len(found) != 1:
            message = f"no {pin.requirement} wheel for Python {python_version} (linux x86-64)"
            if pin.optional:
                print(f"[wheels] warning: {message}; skipped (optional)", file=sys.stderr)
                return None
            raise RuntimeError(f"{message}:\n{_pip_output(proc)}")
        target = os.path.join(dest, found[0])
        shutil.copyfile(os.path.join(tmp, found[0]), target)
    return target


def check_resolution(dest: str, python_version: str, requirements: Sequence[str]) -> str:
    """'' when pip resolves every requirement from ``dest`` alone (offline, ``--no-deps``) for
    ``python_version`` on linux x86-64, else pip's complaint."""
    with tempfile.TemporaryDirectory() as tmp:
        proc = _pip(
            "install", "--dry-run", "--no-index", "--find-links", dest, "--no-deps",
            "--ignore-installed", "--target", tmp, *_platform_args(python_version),
            *requirements,
        )  # fmt: skip
    return "" if proc.returncode == 0 else _pip_output(proc)


def folder_bytes(dest: str) -> int:
    return sum(
        os.path.getsize(os.path.join(dest, f))
        for f in os.listdir(dest)
        if os.path.isfile(os.path.join(dest, f))
    )


def prepare(dest: str, python_versions: Sequence[str], max_mib: float) -> int:
    start = time.time()
    os.makedirs(dest, exist_ok=True)
    _check_tested_versions()
    d2 = _load_detectron2_installer()
    files: Dict[str, Dict[str, object]] = {}
    coverage: Dict[str, List[str]] = {}

    def add(path: str, package: str, pythons: List[str]) -> None:
        name = os.path.basename(path)
        again = name in files  # e.g. one abi3 wheel serves several Python versions
        files[name] = {
            "package": package,
            "sha256": sha256_of(path),
            "bytes": os.path.getsize(path),
        }
        coverage.setdefault(package, []).extend(pythons)
        size = f"{os.path.getsize(path) / 2**20:.1f} MiB"
        print(f"[wheels] {name} ({'same file, also for Python ' + pythons[0] if again else size})")

    try:
        add(_fetch_detectron2(dest), DETECTRON2, list(python_versions))
        for pin in PINS:
            if not pin.compiled:
                add(_fetch_pure(pin, dest), pin.name, list(python_versions))
                continue
            for version in python_versions:
                path = _fetch_compiled(pin, version, dest)
                if path is not None:
                    add(path, pin.name, [version])
    except (RuntimeError, d2.ChecksumError) as exc:
        print(f"[wheels] ERROR: {exc}", file=sys.stderr)
        return 1
    for stale in sorted(set(os.listdir(dest)) - set(files) - {MANIFEST, "requirements.txt"}):
        if stale.endswith(".whl"):
            os.remove(os.path.join(dest, stale))
            print(f"[wheels] removed {stale} (not part of this set)")

    pins = {DETECTRON2: d2.WHEEL_VERSION, **{p.name: p.version for p in PINS}}
    manifest = {
        "python_versions": list(python_versions),
        "platform": "linux x86-64",
        "pins": pins,
        "optional": [p.name for p in PINS if p.optional],
        "python_coverage": {k: sorted(set(v)) for k, v in coverage.items()},
        "files": files,
        "prepared": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    with open(os.path.join(dest, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)

    failed = False
    for version in python_versions:
        reqs = [f"{n}=={v}" for n, v in pins.items() if version in manifest["python_coverage"][n]]
        problem = check_resolution(dest, version, reqs)
        missing = sorted(n for n in pins if version not in manifest["python_coverage"][n])
        status = "ok" if not problem else "FAILED"
        print(
            f"[wheels] offline resolution for Python {version}: {status} ({len(reqs)} packages"
            + (f"; without optional {', '.join(missing)}" if missing else "")
            + ")"
        )
        if problem:
            print(problem, file=sys.stderr)
            failed = True
    size = folder_bytes(dest)
    print(
        f"[wheels] {len(files)} wheels, {size / 2**20:.1f} MiB in {dest} "
        f"({time.time() - start:.0f} s)"
    )
    if size > max_mib * 2**20:
        print(f"[wheels] ERROR: more than --max-mib {max_mib:g} MiB", file=sys.stderr)
        failed = True
    return 1 if failed else 0


# --------------------------------------------------------------------------------- install
def _installed_version(name: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    names = (DETECTRON2, "detectron2") if name == DETECTRON2 else (name,)
    for n in names:
        try:
            return version(n)
        except PackageNotFoundError:
            continue
    return None


def read_manifest(wheels: str) -> Dict[str, object]:
    path = os.path.join(wheels, MANIFEST)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: prepare the folder on a machine with network first "
            "(bash tools/perf_suite.sh prepare, or python scripts/gpu_wheels.py prepare)"
        )
    with open(path) as f:
        return json.load(f)


def missing_packages(manifest: Dict[str, object], python_version: str) -> List[str]:
    """Requirements ``name==pin`` of the manifest that this interpreter lacks (any installed
    version counts as present) and that have a wheel for ``python_version``."""
    out = []
    for name, pin in manifest["pins"].items():
        if python_version not in manifest["python_coverage"].get(name, []):
            continue
        if _installed_version(name) is None:
            out.append(f"{name}=={pin}")
    return out


def install(wheels: str, target: str, dry_run: bool = False) -> int:
    start = time.time()
    try:
        manifest = read_manifest(wheels)
    except FileNotFoundError as exc:
        print(f"[install] ERROR: {exc}", file=sys.stderr)
        return 1
    py = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if py not in manifest["python_versions"]:
        print(
            f"[install] ERROR: {wheels} holds wheels for Python {manifest['python_versions']}, "
            f"this is Python {py}: prepare again with --python-version {py}",
            file=sys.stderr,
        )
        return 1
    for name, info in manifest["files"].items():
        path = os.path.join(wheels, name)
        if not os.path.exists(path) or sha256_of(path) != info["sha256"]:
            print(
                f"[install] ERROR: {path} is missing or differs from the manifest", file=sys.stderr
            )
            return 1
    todo = missing_packages(manifest, py)
    if not todo:
        print("[install] nothing to install: every package is already there")
        return 0
    print(f"[install] {len(todo)} packages into {target}: {' '.join(todo)}")
    if dry_run:
        return 0
    os.makedirs(target, exist_ok=True)
    proc = _pip(
        "install", "--no-index", "--find-links", wheels, "--no-deps", "--upgrade",
        "--target", target, *todo,
    )  # fmt: skip
    if proc.returncode != 0:
        print(f"[install] ERROR: pip failed:\n{_pip_output(proc)}", file=sys.stderr)
        return 1
    # detectron2's bundled _C is built for Python 3.10 and another torch; convmae_det never uses it
    d2_dir = os.path.join(target, "detectron2")
    for name in os.listdir(d2_dir) if os.path.isdir(d2_dir) else []:
        if name.startswith("_C") and name.endswith(".so"):
            os.remove(os.path.join(d2_dir, name))
    print(f"[install] done in {time.time() - start:.0f} s")
    return 0


def check() -> int:
    """0 when every module of :data:`REQUIRED_MODULES` can be found by this interpreter."""
    missing = [m for m in REQUIRED_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        print(f"[check] missing: {' '.join(missing)}")
        return 1
    print("[check] detectron2 and its dependencies are there")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="fill the folder (needs network)")
    p.add_argument("--dest", default=DEFAULT_DEST, help="wheel folder (default: <repo>/wheels)")
    p.add_argument(
        "--python-version",
        action="append",
        default=None,
        help="Python version(s) of the GPU machine, e.g. 3.12 or 3.10,3.11 (repeatable; "
        f"default {','.join(DEFAULT_PYTHON_VERSIONS)}): compiled wheels are fetched for each",
    )
    p.add_argument("--max-mib", type=float, default=48.0, help="fail above this folder size")
    p.add_argument("--dry-run", action="store_true", help="list what would be fetched and exit")
    i = sub.add_parser("install", help="install what this interpreter lacks (offline)")
    i.add_argument(
        "--wheels", default=DEFAULT_DEST, help="prepared folder (default: <repo>/wheels)"
    )
    i.add_argument("--target", required=True, help="folder to install into (put it on PYTHONPATH)")
    i.add_argument("--dry-run", action="store_true", help="say what would be installed")
    sub.add_parser("check", help="exit 0 when detectron2 and its dependencies can be imported")
    args = parser.parse_args(argv)

    if args.command == "check":
        return check()
    if args.command == "install":
        return install(args.wheels, args.target, dry_run=args.dry_run)
    versions: List[str] = []
    for item in args.python_version or list(DEFAULT_PYTHON_VERSIONS):
        for v in item.split(","):
            v = v.strip()
            if not re.fullmatch(r"3\.\d{1,2}", v):
                parser.error(f"--python-version {v!r}: expected a version like 3.12")
            if v not in versions:
                versions.append(v)
    if args.dry_run:
        for step in plan(versions):
            print(f"{step['package']:<38} python {step['python']:<5} {step['how']}")
        print(f"into {os.path.abspath(args.dest)}; then an offline resolution check per version")
        return 0
    return prepare(args.dest, versions, args.max_mib)


if __name__ == "__main__":
    sys.exit(main())
