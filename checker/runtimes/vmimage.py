"""Build the guest image of the `vm` runtime: a kernel and an initramfs.

Run by `scripts/build-vm-image.sh`, which fetches Debian's cloud kernel package
and builds a Debian root file system with python3 first::

    python -m checker.runtimes.vmimage --kernel-package DIR --rootfs DIR --output DIR

The output directory gets:

    vmlinuz          the kernel (a bzImage, which QEMU's microvm machine boots directly)
    initramfs.cpio   the root file system, uncompressed "newc" cpio; the guest keeps it in RAM
    image.json       kernel release and sizes, for `checker doctor` and the job's events

The initramfs is the root file system without documentation, package
manager state and Perl, plus the virtio drivers the guest needs (in
dependency order) and vmguest.py as /init. It is uncompressed because
decompression runs as emulated guest code under TCG, several times slower
than copying.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import sys
from pathlib import Path

GUEST_MODULES = ("virtio_mmio", "virtio_net", "virtio_console")
"""Drivers the guest needs, without their dependencies: the transport, the network and the serial ports."""

LEFT_OUT = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "usr/share/perl5",
    "usr/share/common-licenses",
    "usr/lib/x86_64-linux-gnu/perl-base",
    "usr/lib/x86_64-linux-gnu/gconv",
    "usr/bin/perl",
    "usr/lib/python3.11/pydoc_data",
    "usr/lib/python3.11/ensurepip",
    "usr/lib/python3.11/idlelib",
    "usr/lib/python3.11/lib2to3",
    "var/lib/apt",
    "var/lib/dpkg",
    "var/cache",
    "var/log",
    "init",
)
"""Paths of the root file system the guest never uses; each one costs boot time and guest RAM."""

MODULE_DIR = "usr/lib/checker-modules"
NEWC_MAGIC = b"070701"


def module_dependencies(module: Path) -> list[str]:
    """Return the names in the `depends=` entry of a kernel module's .modinfo section."""
    data = module.read_bytes()
    start = data.find(b"\0depends=")
    if start < 0:
        return []
    end = data.index(b"\0", start + 1)
    value = data[start + len(b"\0depends=") : end].decode()
    return [name for name in value.split(",") if name]


def resolve_modules(modules_root: Path, wanted: tuple[str, ...]) -> list[Path]:
    """Return the module files for `wanted` and their dependencies, every module after those it depends on."""
    by_name = {}
    for path in modules_root.rglob("*.ko"):
        by_name[path.stem.replace("-", "_")] = path

    ordered: list[Path] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        key = name.replace("-", "_")
        if key not in by_name:
            raise SystemExit(f"vmimage: kernel module {name!r} is missing from {modules_root}; is this a Debian cloud or generic kernel?")
        path = by_name[key]
        if path in ordered or key in visiting:
            return
        visiting.add(key)
        for dependency in module_dependencies(path):
            visit(dependency)
        ordered.append(path)

    for name in wanted:
        visit(name)
    return ordered


def newc_header(inode: int, mode: int, size: int, mtime: int, name: str) -> bytes:
    encoded = name.encode() + b"\0"
    fields = (inode, mode, 0, 0, 1, mtime, size, 0, 0, 0, 0, len(encoded), 0)
    header = NEWC_MAGIC + b"".join(b"%08X" % value for value in fields) + encoded
    return header + b"\0" * (-len(header) % 4)


class NewcWriter:
    """Writes a cpio archive in the kernel's "newc" format, every entry owned by root."""

    def __init__(self, output) -> None:
        self.output = output
        self.inode = 0

    def add(self, name: str, mode: int, data: bytes = b"", mtime: int = 0) -> None:
        self.inode += 1
        self.output.write(newc_header(self.inode, mode, len(data), mtime, name))
        self.output.write(data)
        self.output.write(b"\0" * (-len(data) % 4))

    def add_tree(self, root: Path, left_out: tuple[str, ...]) -> None:
        for directory, subdirectories, file_names in os.walk(root):
            relative_directory = os.path.relpath(directory, root)
            subdirectories[:] = sorted(name for name in subdirectories if not self._left_out(relative_directory, name, left_out))
            # os.walk lists symbolic links to directories among the directories.
            for name in subdirectories + sorted(name for name in file_names if not self._left_out(relative_directory, name, left_out)):
                self.add_path(Path(directory) / name, os.path.normpath(os.path.join(relative_directory, name)))

    @staticmethod
    def _left_out(directory: str, name: str, left_out: tuple[str, ...]) -> bool:
        return os.path.normpath(os.path.join(directory, name)) in left_out

    def add_path(self, path: Path, name: str) -> None:
        status = path.lstat()
        if stat.S_ISREG(status.st_mode):
            data = path.read_bytes()
        elif stat.S_ISLNK(status.st_mode):
            data = os.readlink(path).encode()
        elif stat.S_ISDIR(status.st_mode):
            data = b""
        else:
            return  # Device nodes and sockets: the guest's devtmpfs provides devices.
        self.add(name, status.st_mode, data, int(status.st_mtime))

    def finish(self) -> None:
        self.add("TRAILER!!!", 0)


def build(kernel_package: Path, rootfs: Path, output: Path) -> dict:
    kernels = sorted((kernel_package / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise SystemExit(f"vmimage: {kernel_package}/boot has no vmlinuz-*; extract a linux-image package there")
    kernel = kernels[-1]
    release = kernel.name[len("vmlinuz-") :]
    modules = resolve_modules(kernel_package / "lib" / "modules" / release, GUEST_MODULES)
    if not (rootfs / "usr" / "bin" / "python3").exists():
        raise SystemExit(f"vmimage: {rootfs} has no usr/bin/python3; build it with scripts/build-rootfs.sh")

    output.mkdir(parents=True, exist_ok=True)
    staging = output / "initramfs.cpio.tmp"
    with open(staging, "wb") as archive_file:
        writer = NewcWriter(archive_file)
        writer.add_tree(rootfs, LEFT_OUT)
        writer.add(MODULE_DIR, stat.S_IFDIR | 0o755)
        for module in modules:
            writer.add(f"{MODULE_DIR}/{module.name}", stat.S_IFREG | 0o644, module.read_bytes())
        writer.add(f"{MODULE_DIR}/order", stat.S_IFREG | 0o644, "".join(f"{module.name}\n" for module in modules).encode())
        init = Path(__file__).with_name("vmguest.py").read_bytes()
        writer.add("init", stat.S_IFREG | 0o755, b"#!/usr/bin/python3 -IS\n" + init)
        writer.finish()
    shutil.copyfile(kernel, output / "vmlinuz.tmp")

    description = {
        "kernel_release": release,
        "kernel_bytes": kernel.stat().st_size,
        "initramfs_bytes": staging.stat().st_size,
        "modules": [module.name for module in modules],
    }
    os.replace(output / "vmlinuz.tmp", output / "vmlinuz")
    os.replace(staging, output / "initramfs.cpio")
    (output / "image.json").write_text(json.dumps(description, indent=1) + "\n")
    return description


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the kernel and initramfs of the vm runtime's guest.")
    parser.add_argument("--kernel-package", type=Path, required=True, help="directory with an extracted linux-image package")
    parser.add_argument("--rootfs", type=Path, required=True, help="Debian root file system with python3")
    parser.add_argument("--output", type=Path, required=True, help="directory for vmlinuz, initramfs.cpio and image.json")
    arguments = parser.parse_args(argv)
    description = build(arguments.kernel_package, arguments.rootfs, arguments.output)
    print(f"vmimage: kernel {description['kernel_release']}, initramfs {description['initramfs_bytes'] / 2**20:.0f} MiB in {arguments.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
