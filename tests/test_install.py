"""The install step verifies the detectron2 wheel before installing it."""

import hashlib
import importlib.util
import os

import pytest

from tests.conftest import ROOT


def load_installer():
    path = os.path.join(ROOT, "scripts", "install_detectron2.py")
    spec = importlib.util.spec_from_file_location("install_detectron2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sha256_mismatch_is_refused(tmp_path):
    installer = load_installer()
    fake = tmp_path / installer.WHEEL_NAME
    fake.write_bytes(b"not the verified wheel")
    with pytest.raises(installer.ChecksumError, match="Refusing to install"):
        installer.verify_sha256(str(fake))


def test_matching_sha256_is_accepted(tmp_path):
    installer = load_installer()
    data = b"some wheel bytes"
    path = tmp_path / "w.whl"
    path.write_bytes(data)
    installer.verify_sha256(str(path), hashlib.sha256(data).hexdigest())


def test_install_refuses_a_tampered_download_and_installs_nothing(tmp_path, monkeypatch):
    installer = load_installer()
    (tmp_path / installer.WHEEL_NAME).write_bytes(b"tampered")
    calls = []
    monkeypatch.setattr(installer, "_pip", lambda *args: calls.append(args))
    assert installer.main(["--force", "--download-dir", str(tmp_path)]) == 1
    assert not any("install" in a for a in calls)


def test_pinned_checksum_is_the_verified_one():
    installer = load_installer()
    assert (
        installer.WHEEL_SHA256 == "491af0c7f79bdb2d178e46f6cb16a97c4ac968d45c41ea3f6b6435d59bbee561"
    )


def test_package_is_installed_for_use_outside_the_repository(tmp_path):
    # `make install` installs convmae_det (editable): a script run from another folder, or a tool
    # run by path, imports this checkout without PYTHONPATH
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", "import convmae_det; print(convmae_det.__file__)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = proc.stdout.strip().splitlines()[-1]
    assert os.path.samefile(os.path.dirname(printed), os.path.join(ROOT, "convmae_det"))
