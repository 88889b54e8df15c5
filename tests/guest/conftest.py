"""Fixtures for the real-guest tests: Debian QEMU 7.2 + Linux 6.1 + busybox under TCG.

Session-scoped: ``guest_deps`` (runs scripts/ensure-guest-deps.sh once) and ``guest_image``
(builds or reuses the cached kernel copy + initramfs). Function-scoped:
``guest_vm_factory`` (boots ``GuestVM``s and tears every one down after the test) and
``guest_tmp`` (a short temporary directory for UNIX sockets: their paths must stay under
108 bytes, which pytest's ``tmp_path`` does not guarantee).

Missing packages: with ``CI`` set in the environment the tests FAIL (a CI run that skips
the real-guest tests proves nothing); elsewhere they are skipped with a loud message.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.guest.initramfs import GuestBuildError, GuestImage, build_guest_image
from tests.guest.vm import GuestVM

REPO_ROOT = Path(__file__).resolve().parents[2]
ENSURE_DEPS = REPO_ROOT / "scripts" / "ensure-guest-deps.sh"
GUEST_DIR = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    """Every test under tests/guest/ carries the ``guest`` marker (``-m 'not guest'``)."""
    for item in items:
        if GUEST_DIR in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.guest)


def _unavailable(message: str) -> None:
    banner = "#" * 72
    text = f"\n{banner}\nREAL-GUEST TESTS CANNOT RUN: {message}\n{banner}\n"
    print(text, file=sys.stderr)
    if os.environ.get("CI"):
        pytest.fail(text, pytrace=False)
    pytest.skip(text)


@pytest.fixture(scope="session")
def guest_deps() -> None:
    """Install (as root) or check the Debian packages the guest tests need."""
    res = subprocess.run([str(ENSURE_DEPS)], capture_output=True, text=True)
    if res.returncode != 0:
        _unavailable(f"{ENSURE_DEPS.name} exited {res.returncode}:\n{res.stdout}{res.stderr}")
    if shutil.which("qemu-system-x86_64") is None:
        _unavailable("qemu-system-x86_64 not on PATH")


@pytest.fixture(scope="session")
def guest_image(guest_deps) -> GuestImage:
    """Kernel copy + initramfs (cached in tests/guest/.cache/, rebuilt when inputs change)."""
    try:
        return build_guest_image()
    except (GuestBuildError, PermissionError) as exc:
        _unavailable(f"cannot build the guest image: {exc}")
        raise  # unreachable: _unavailable raises


@pytest.fixture
def guest_tmp():
    """A short-path temporary directory (for UNIX sockets), removed after the test."""
    path = Path(tempfile.mkdtemp(prefix="gt-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def guest_vm_factory(guest_image, request):
    """Returns ``make(extra_qemu_args=(), mem="512M", *, start=True, vhost_user_vsock=None,
    guest_cid=None, **GuestVM_kwargs) -> GuestVM``.

    ``vhost_user_vsock``: a back-end socket path; adds ``-device vhost-user-vsock-pci``
    (the back-end must be listening before the VM starts). ``start=False`` returns the
    VM unstarted so the test can add devices (``vm.add_*``) and then call ``vm.start()``.
    Every VM is stopped (QEMU killed and reaped) when the test ends; if the test failed,
    the console log path is printed.
    """
    vms: list[GuestVM] = []
    workdirs: list[Path] = []

    def make(
        extra_qemu_args=(),
        mem: str = "512M",
        *,
        start: bool = True,
        vhost_user_vsock: os.PathLike | str | None = None,
        guest_cid: int | None = None,
        **kwargs,
    ) -> GuestVM:
        if "workdir" not in kwargs:
            kwargs["workdir"] = Path(tempfile.mkdtemp(prefix="gvm-"))
            workdirs.append(kwargs["workdir"])
        vm = GuestVM(guest_image.kernel, guest_image.initramfs, extra_qemu_args, mem, **kwargs)
        if vhost_user_vsock is not None:
            vm.add_vhost_user_vsock(vhost_user_vsock, guest_cid)
        elif guest_cid is not None:
            vm.guest_cid = guest_cid
        vms.append(vm)
        if start:
            vm.start()
        return vm

    yield make
    for vm in vms:
        vm.stop()
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        for vm in vms:
            print(f"guest console log kept: {vm.workdir / 'console.log'}", file=sys.stderr)
    else:
        for path in workdirs:
            shutil.rmtree(path, ignore_errors=True)


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Record each phase's report on the item (``rep_call``) so fixtures see failures."""
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
