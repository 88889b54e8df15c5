"""Build the test guest's boot files: a busybox initramfs and a readable kernel copy.

The initramfs holds busybox-static (with applet symlinks), the virtio/vsock kernel modules
of the installed Debian kernel (decompressed: busybox ``insmod`` cannot read .ko.xz), the
static ``vsock_helper`` compiled from ``helper/vsock_helper.c``, Debian's ``qemu-ga`` with
its shared libraries and loader, and ``/init`` + ``/bin/guest-agent`` from ``rootfs/``.

Results are cached under ``tests/guest/.cache/<key>/`` where ``key`` hashes every input
(this file, the rootfs scripts, the helper source, busybox, qemu-ga and its libraries, the
modules and the kernel), so a rebuild happens only when an input changes. The kernel image
is copied because ``/boot/vmlinuz-*`` is readable by root only.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import io
import logging
import lzma
import os
import re
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

GUEST_DIR = Path(__file__).resolve().parent
CACHE_DIR = GUEST_DIR / ".cache"
ROOTFS_DIR = GUEST_DIR / "rootfs"
HELPER_SOURCE = GUEST_DIR / "helper" / "vsock_helper.c"

# Load order matters: each module's dependencies come first (no modprobe in the guest).
# vsock_loopback lets the guest test vsock_helper against itself (CID 1) with no device.
GUEST_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_console",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
    "vsock_loopback",
)

BUSYBOX = Path("/bin/busybox")
QEMU_GA = Path("/usr/sbin/qemu-ga")


class GuestBuildError(RuntimeError):
    """The guest boot files could not be built (missing package, compiler error...)."""


@dataclasses.dataclass(frozen=True, slots=True)
class GuestImage:
    """Paths of a built guest: give ``kernel`` and ``initramfs`` to ``GuestVM``.

    ``kernel`` is the uncompressed ELF ``vmlinux`` when it could be extracted (QEMU then
    boots it through the PVH entry point, skipping SeaBIOS's real-mode loader and the
    xz self-decompression that costs ~5 s under TCG), else the bzImage copy ``vmlinuz``.
    """

    kernel: Path
    initramfs: Path
    kernel_version: str
    vmlinuz: Path


# ---------------------------------------------------------------------------------------
# Input discovery


def find_kernel_version(modules_root: Path = Path("/lib/modules")) -> str:
    """The newest installed Debian kernel that has both /boot/vmlinuz-V and modules."""
    candidates = []
    for vmlinuz in glob.glob("/boot/vmlinuz-*"):
        version = vmlinuz.removeprefix("/boot/vmlinuz-")
        if (modules_root / version / "kernel").is_dir():
            candidates.append(version)
    if not candidates:
        raise GuestBuildError(
            "no /boot/vmlinuz-* with matching /lib/modules/*: run scripts/ensure-guest-deps.sh"
        )

    def version_key(v: str) -> list:
        return [int(p) if p.isdigit() else p for p in re.split(r"[.-]", v)]

    return max(candidates, key=version_key)


def find_module(version: str, name: str) -> Path:
    """The file of kernel module ``name`` (.ko, .ko.xz, .ko.zst, .ko.gz)."""
    root = Path("/lib/modules") / version / "kernel"
    for suffix in (".ko", ".ko.xz", ".ko.zst", ".ko.gz"):
        hits = sorted(root.rglob(name + suffix))
        if hits:
            return hits[0]
    raise GuestBuildError(f"kernel module {name} not found under {root}")


def read_module(path: Path) -> bytes:
    """Module bytes, decompressed."""
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix == ".gz":
        return gzip.decompress(data)
    if path.suffix == ".zst":
        return subprocess.run(
            ["zstd", "-dc", str(path)], check=True, capture_output=True
        ).stdout
    return data


def shared_libraries(binary: Path) -> list[Path]:
    """Absolute paths of ``binary``'s shared libraries and its dynamic loader (ldd)."""
    out = subprocess.run(
        ["ldd", str(binary)], check=True, capture_output=True, text=True
    ).stdout
    libs = []
    for line in out.splitlines():
        line = line.strip()
        m = re.match(r"\S+ => (/\S+)", line) or re.match(r"(/\S+) \(0x", line)
        if m:
            libs.append(Path(m.group(1)))
        elif "not found" in line:
            raise GuestBuildError(f"{binary}: {line}")
    return libs


def busybox_applets(busybox: Path) -> list[str]:
    out = subprocess.run(
        [str(busybox), "--list-full"], check=True, capture_output=True, text=True
    ).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------
# cpio "newc" writer (the format the kernel unpacks; see Documentation/driver-api/
# early-userspace/buffer-format.rst)


class CpioWriter:
    """Writes a newc archive: directories, regular files, symlinks and device nodes."""

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._ino = 1
        self._seen: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        name = name.lstrip("/")
        if name in self._seen:
            return
        self._seen.add(name)
        encoded = name.encode() + b"\0"
        fields = (
            self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0,
        )
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._out.write(header + encoded)
        self._pad()
        self._out.write(data)
        self._pad()

    def _pad(self) -> None:
        self._out.write(b"\0" * (-self._out.tell() % 4))

    def directory(self, name: str) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            self._entry("/".join(parts[:i]), stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        if "/" in name.strip("/"):
            self.directory(os.path.dirname(name.strip("/")))
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        if "/" in name.strip("/"):
            self.directory(os.path.dirname(name.strip("/")))
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self._out.getvalue()


# ---------------------------------------------------------------------------------------
# Build


_XZ_MAGIC = b"\xfd7zXZ\x00"
_ELF_MAGIC = b"\x7fELF"


def extract_vmlinux(bzimage: bytes) -> bytes | None:
    """The ELF vmlinux inside an xz-compressed bzImage (what Linux's
    scripts/extract-vmlinux does: find the payload's magic and decompress), or None."""
    offset = bzimage.find(_XZ_MAGIC)
    while offset >= 0:
        try:
            elf = lzma.LZMADecompressor().decompress(bzimage[offset:])
        except lzma.LZMAError:
            elf = b""
        if elf.startswith(_ELF_MAGIC):
            return elf
        offset = bzimage.find(_XZ_MAGIC, offset + 1)
    return None


def compile_helper(out_path: Path) -> None:
    """gcc -static the guest helper (it runs in a guest with no libc of its own)."""
    cmd = ["gcc", "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out_path), str(HELPER_SOURCE)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise GuestBuildError(f"{' '.join(cmd)} failed:\n{res.stderr}")


def _inputs(version: str) -> list[Path]:
    kernel = Path(f"/boot/vmlinuz-{version}")
    files = [Path(__file__).resolve(), HELPER_SOURCE, BUSYBOX, QEMU_GA, kernel]
    files += sorted(p for p in ROOTFS_DIR.rglob("*") if p.is_file())
    files += [find_module(version, m) for m in GUEST_MODULES]
    files += shared_libraries(QEMU_GA)
    return files


def _cache_key(version: str) -> str:
    digest = hashlib.sha256()
    for path in _inputs(version):
        digest.update(str(path).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:20]


def _build_cpio(version: str, helper: Path) -> bytes:
    cpio = CpioWriter()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "run",
              "etc", "root", "var", "lib/modules", "lib64"):
        cpio.directory(d)
    # The kernel opens /dev/console for init before /init can mount devtmpfs.
    cpio.char_device("dev/console", 5, 1)
    cpio.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    for applet in busybox_applets(BUSYBOX):
        if applet != "bin/busybox":
            depth = applet.count("/")
            cpio.symlink(applet, "../" * depth + "bin/busybox")
    for name in GUEST_MODULES:
        cpio.file(f"lib/modules/{name}.ko", read_module(find_module(version, name)))
    cpio.file("etc/modules.order", "".join(m + "\n" for m in GUEST_MODULES).encode())
    cpio.file("bin/vsock_helper", helper.read_bytes(), 0o755)
    cpio.file("usr/sbin/qemu-ga", QEMU_GA.read_bytes(), 0o755)
    for lib in shared_libraries(QEMU_GA):
        cpio.file(str(lib), lib.resolve().read_bytes(), 0o755)
    cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    cpio.file("etc/group", b"root:x:0:\n")
    for path in sorted(ROOTFS_DIR.rglob("*")):
        if path.is_file():
            rel = path.relative_to(ROOTFS_DIR).as_posix()
            cpio.file(rel, path.read_bytes(), 0o755 if os.access(path, os.X_OK) else 0o644)
    return cpio.finish()


def build_guest_image(cache_dir: Path = CACHE_DIR) -> GuestImage:
    """Build (or reuse from the cache) the kernel copy and initramfs for the test guest."""
    for needed in (BUSYBOX, QEMU_GA):
        if not needed.exists():
            raise GuestBuildError(f"{needed} missing: run scripts/ensure-guest-deps.sh")
    version = find_kernel_version()
    key = _cache_key(version)
    out_dir = cache_dir / key
    vmlinuz = out_dir / f"vmlinuz-{version}"
    vmlinux = out_dir / f"vmlinux-{version}"
    initramfs = out_dir / "initramfs.cpio.gz"
    if vmlinuz.exists() and initramfs.exists():
        kernel = vmlinux if vmlinux.exists() else vmlinuz
        log.debug("guest image cache hit %s", out_dir)
        return GuestImage(kernel, initramfs, version, vmlinuz)

    cache_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="build-", dir=cache_dir))
    try:
        helper = work / "vsock_helper"
        compile_helper(helper)
        cpio = _build_cpio(version, helper)
        (work / initramfs.name).write_bytes(gzip.compress(cpio, compresslevel=1))
        bzimage = Path(f"/boot/vmlinuz-{version}").read_bytes()
        elf = extract_vmlinux(bzimage)
        if elf is not None:
            (work / vmlinux.name).write_bytes(elf)
        (work / vmlinuz.name).write_bytes(bzimage)  # last: its presence marks completion
        helper.unlink()
        work.chmod(0o755)
        try:
            work.rename(out_dir)  # atomic: concurrent builders race harmlessly
        except OSError:
            if not (vmlinuz.exists() and initramfs.exists()):
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("built guest image %s (kernel %s)", out_dir, version)
    return GuestImage(vmlinux if vmlinux.exists() else vmlinuz, initramfs, version, vmlinuz)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(build_guest_image())
