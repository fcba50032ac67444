"""The `vm` runtime: each job in its own QEMU microVM, checkpointed by saving the whole VM.

Layout of a running job, as seen from the host::

    qemu-system-x86_64 -M microvm     the job's ProcessIdentity; exits when the guest powers off
      guest kernel (Debian cloud kernel) and initramfs from scripts/build-vm-image.sh
        /init = vmguest.py            PID 1 of the guest
          the job's command           stdout/stderr to virtio-serial ports

The host side of the job's files, in `JOB_DIR/vm/`:

    qmp.sock           QMP, through which the runtime stops, saves, continues and quits the VM
    control.sock       the guest init's control port: launch the job, freeze it, thaw it with the time and identity
    exit-status.port   what the guest init writes to its exit port when the job ends
    console.log        the guest's serial console (kernel messages, init errors)
    qemu.log           QEMU's own output
    machine.json       the machine definition of the running VM
    qemu.pid           QEMU's PID, for finding a VM after a server restart

Standard output and error go to the job's usual log files. The guest has user
networking restricted to one forwarded address, API_ADDRESS: each TCP
connection the job opens to it starts vmrelay.py on the host, which connects
to the job's own unix socket (`api.sock`). So the job reaches the server and
nothing else, and the server closes that socket while it checkpoints, as for
the gvisor runtime.

A checkpoint asks the guest init to stop every process of the job (SIGSTOP),
stops the VM (QMP `stop`) and migrates it to a command that compresses the
stream with zstd into `memory.zst` of the image, beside `machine.json`. The
guest's writable files (its work directory included) live in guest RAM, so
the snapshot holds them; nothing on a disk can change between a checkpoint
and a restore. A restore starts QEMU with the same machine definition and
`-incoming`, waits until the stream is loaded and continues the VM. Each
time the VM continues, the runtime sends the guest init the current time,
the job's identity and fresh entropy, and only then does the init let the
job continue: the guest clock stood still while the snapshot waited, and a
fork has another identity than its source.

QEMU uses KVM when /dev/kvm can run a stock guest kernel, else TCG, QEMU's
software emulation (slower guest code, same behaviour). `accelerator()`
decides and says why; the decision is in each job's events.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import checker
from checker.errors import CheckerError, ErrorCode
from checker.runtimes import procfs
from checker.runtimes.base import INHERITED_ENV, ExitStatus, JobFiles, LaunchSpec, Runtime, read_exit_status
from checker.runtimes.cgroups import Limits
from checker.runtimes.procfs import ProcessIdentity
from checker.sdk.client import ENV_API_URL, ENV_IDENTITY_FILE

logger = logging.getLogger(__name__)

ENV_QEMU = "CHECKER_QEMU"
DEFAULT_IMAGE_DIR = Path("/opt/checker/vm")
API_ADDRESS = "10.0.2.100"
"""Address in the guest's user network that is forwarded to the job's unix socket."""
API_PORT = 80
GUEST_JOB_DIR = "/run/checker/job"
GUEST_SDK_DIR = "/opt/checker/lib"
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MEMORY_NAME = "memory.zst"
MACHINE_NAME = "machine.json"
MACHINE_FORMAT = 1
"""Version of machine.json. A restore accepts only this version: a snapshot needs the exact machine it was taken on."""

DEFAULT_MEMORY_MIB = 512
MIN_MEMORY_MIB = 256
"""The initramfs alone takes about 100 MiB of guest RAM."""
MAX_FILES_BYTES = 64 << 20
"""Largest total size of the definition's `files`; they are copied into guest RAM at each start."""
BOOT_TIMEOUT_SECONDS = 180.0
"""Seconds from QEMU's start to the job's start in the guest; TCG boots take a few seconds."""
GUEST_REPLY_SECONDS = 30.0
SAVE_TIMEOUT_SECONDS = 1800.0
POLL_SECONDS = 0.05
STOP_ATTEMPTS = 200
"""Attempts to find the guest without a connection to the server, POLL_SECONDS apart."""
CONFIG_KEYS = frozenset({"command", "env", "files", "memory_mib", "vcpus", "accelerator", "kernel", "initramfs"})
ACCELERATORS = ("auto", "kvm", "tcg")


def find_qemu() -> Path | None:
    """Return the QEMU x86 system emulator from CHECKER_QEMU or PATH; None when there is none."""
    configured = os.environ.get(ENV_QEMU)
    if configured and os.access(configured, os.X_OK):
        return Path(configured)
    found = shutil.which("qemu-system-x86_64")
    return Path(found) if found else None


def accelerator(requested: str = "auto") -> tuple[str, str]:
    """Return the accelerator to use, "kvm" or "tcg", and the reason for the choice."""
    if requested == "tcg":
        return "tcg", "TCG (software emulation), as the definition asks"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg", "TCG (software emulation): /dev/kvm is missing or not accessible"
    flags = cpu_flags()
    if "vmx" not in flags and "svm" not in flags:
        # A paravirtualized /dev/kvm (kvm-pvm) accepts VMs, but stock guest
        # kernels die there on the first instruction it cannot emulate.
        return "tcg", "TCG (software emulation): /dev/kvm is present but the CPU has no VMX or SVM, so it cannot run a stock guest kernel"
    return "kvm", "KVM (hardware virtualization)"


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def tsc_khz() -> int | None:
    """Return the host's CPU frequency in kHz, which the guest kernel takes as its TSC frequency."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("cpu MHz"):
                    return int(float(line.split(":", 1)[1]) * 1000)
    except (OSError, ValueError):
        pass
    return None


@dataclass(frozen=True)
class Machine:
    """The VM a job runs in; a snapshot restores only into the same machine."""

    memory_mib: int
    """Guest RAM in MiB."""
    vcpus: int
    accelerator: str
    """"kvm" or "tcg"."""
    kernel: str
    """Path of the guest kernel on the host."""
    initramfs: str
    """Path of the guest's initramfs on the host."""
    tsc_khz: int | None
    """TSC frequency given to the guest kernel; without it some TCG boots hang calibrating."""

    def write(self, path: Path) -> None:
        staging = path.with_suffix(".tmp")
        staging.write_text(json.dumps({"format": MACHINE_FORMAT, **asdict(self)}, indent=1) + "\n")
        os.replace(staging, path)

    @classmethod
    def read(cls, path: Path) -> "Machine":
        """Read machine.json; raise ValueError naming the problem when it is missing or invalid."""
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"{path} is missing; the image was not written by the vm runtime") from None
        except ValueError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None
        if not isinstance(data, dict) or data.get("format") != MACHINE_FORMAT:
            found = data.get("format") if isinstance(data, dict) else None
            raise ValueError(f"{path} has format {found!r}; this Checker restores only format {MACHINE_FORMAT}")
        values = {}
        for name, kind in (("memory_mib", int), ("vcpus", int), ("accelerator", str), ("kernel", str), ("initramfs", str), ("tsc_khz", (int, type(None)))):
            value = data.get(name)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ValueError(f"{path} has no valid {name!r}: found {value!r}")
            values[name] = value
        return cls(**values)


@dataclass(frozen=True)
class VmFiles:
    """The host-side files of one job's VM."""

    directory: Path

    @classmethod
    def of(cls, files: JobFiles) -> "VmFiles":
        return cls(files.job_dir / "vm")

    @property
    def qmp_socket(self) -> Path:
        return self.directory / "qmp.sock"

    @property
    def control_socket(self) -> Path:
        return self.directory / "control.sock"

    @property
    def exit_port(self) -> Path:
        return self.directory / "exit-status.port"

    @property
    def console_log(self) -> Path:
        return self.directory / "console.log"

    @property
    def qemu_log(self) -> Path:
        return self.directory / "qemu.log"

    @property
    def machine(self) -> Path:
        return self.directory / MACHINE_NAME

    @property
    def pid_file(self) -> Path:
        return self.directory / "qemu.pid"

    def prepare(self) -> None:
        """Create the directory and remove what an earlier QEMU of the job left."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in (self.qmp_socket, self.control_socket, self.exit_port, self.pid_file):
            stale.unlink(missing_ok=True)


class Qmp:
    """A QMP connection: one JSON command at a time, events skipped."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, path: Path, timeout: float = 10.0) -> "Qmp":
        deadline = time.monotonic() + timeout
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 20)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(POLL_SECONDS)
        qmp = cls(reader, writer)
        await qmp._read_reply(timeout)  # the greeting
        await qmp.execute("qmp_capabilities")
        return qmp

    async def execute(self, command: str, arguments: dict | None = None, timeout: float = 30.0) -> dict:
        """Run one command; return its result, or raise RuntimeError with QEMU's error description."""
        message = {"execute": command, **({"arguments": arguments} if arguments else {})}
        self.writer.write(json.dumps(message).encode() + b"\n")
        await self.writer.drain()
        reply = await self._read_reply(timeout)
        if "error" in reply:
            raise RuntimeError(f"QMP {command}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return", {})

    async def _read_reply(self, timeout: float) -> dict:
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            if not line:
                raise ConnectionError("QEMU closed the QMP connection")
            reply = json.loads(line)
            if "event" not in reply:
                return reply

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


class VmRuntime(Runtime):
    """Jobs in QEMU microVMs, saved and restored through QEMU's migration."""

    type_name = "vm"

    def __init__(self, qemu: Path, image_dir: Path = DEFAULT_IMAGE_DIR) -> None:
        self.qemu = qemu
        self.image_dir = image_dir
        """Directory with the default guest kernel and initramfs, from scripts/build-vm-image.sh."""
        self._launchers: dict[int, subprocess.Popen] = {}

    def uses_job_socket(self, config: dict) -> bool:
        return True

    # Configuration

    def validate_config(self, config: dict) -> None:
        unknown = sorted(set(config) - CONFIG_KEYS)
        if unknown:
            raise ValueError(f"runtime key {unknown[0]!r} is not known to the vm runtime; use {', '.join(sorted(CONFIG_KEYS))}")

        command = config.get("command")
        if not isinstance(command, list) or not command or not all(isinstance(part, str) and part for part in command):
            raise ValueError('runtime.command must be a non-empty list of non-empty strings, e.g. ["python3", "/srv/job.py"]')

        memory = config.get("memory_mib", DEFAULT_MEMORY_MIB)
        if isinstance(memory, bool) or not isinstance(memory, int) or memory < MIN_MEMORY_MIB:
            raise ValueError(f"runtime.memory_mib {memory!r} is invalid: give the guest's RAM as a whole number of MiB, at least {MIN_MEMORY_MIB}")
        reject_memory_above_host("runtime.memory_mib", memory)

        vcpus = config.get("vcpus", 1)
        if isinstance(vcpus, bool) or not isinstance(vcpus, int) or not 1 <= vcpus <= 64:
            raise ValueError(f"runtime.vcpus {vcpus!r} is invalid: give a whole number from 1 to 64")

        requested = config.get("accelerator", "auto")
        if requested not in ACCELERATORS:
            raise ValueError(f"runtime.accelerator {requested!r} is not supported; use one of {', '.join(ACCELERATORS)}")
        if requested == "kvm":
            chosen, reason = accelerator("auto")
            if chosen != "kvm":
                raise ValueError(f"runtime.accelerator 'kvm' cannot work on this machine: {reason.split(': ', 1)[-1]}; use 'auto' or 'tcg'")

        for name in ("kernel", "initramfs"):
            path = config.get(name)
            if path is not None and (not isinstance(path, str) or not os.path.isabs(path) or not os.path.isfile(path)):
                raise ValueError(f"runtime.{name} {path!r} is not an existing file; give an absolute path or leave it out to use {self.image_dir}")

        self._files_of(config)

        env = config.get("env", {})
        if not isinstance(env, dict) or not all(isinstance(key, str) and isinstance(value, str) for key, value in env.items()):
            raise ValueError("runtime.env must map names to string values")

    def validate_limits(self, limits: Limits) -> None:
        if limits.pids is not None:
            raise ValueError("the vm runtime cannot limit pids: the guest kernel owns its processes; remove the pids limit")
        if limits.cpu_cores is not None and (limits.cpu_cores < 1 or limits.cpu_cores != int(limits.cpu_cores)):
            raise ValueError(f"cpu_cores {limits.cpu_cores} cannot be a vm job's vCPU count; give a whole number of at least 1")
        if limits.memory_mib is not None and limits.memory_mib < MIN_MEMORY_MIB:
            raise ValueError(f"memory_mib {limits.memory_mib} is below the vm runtime's minimum guest RAM of {MIN_MEMORY_MIB} MiB")
        if limits.memory_mib is not None:
            reject_memory_above_host("memory_mib", limits.memory_mib)

    def _files_of(self, config: dict) -> list[Path]:
        """Return the definition's `files`, checked: absolute host paths that exist, at most MAX_FILES_BYTES in all."""
        paths = config.get("files", [])
        if not isinstance(paths, list):
            raise ValueError('runtime.files must be a list of absolute host paths, e.g. ["/srv/job.py"]')
        total = 0
        checked = []
        for path in paths:
            if not isinstance(path, str) or not os.path.isabs(path) or not os.path.exists(path):
                raise ValueError(f"runtime.files entry {path!r} is not an existing absolute host path")
            total += tree_size(Path(path))
            checked.append(Path(path))
        if total > MAX_FILES_BYTES:
            raise ValueError(f"runtime.files hold {total / 2**20:.1f} MiB; the vm runtime copies at most {MAX_FILES_BYTES >> 20} MiB into the guest")
        return checked

    def machine_for(self, config: dict, limits: Limits) -> Machine:
        """Return the machine a new job of `config` runs in; the limits' memory and CPU override the definition's."""
        memory = limits.memory_mib if limits.memory_mib is not None else config.get("memory_mib", DEFAULT_MEMORY_MIB)
        vcpus = int(limits.cpu_cores) if limits.cpu_cores is not None else config.get("vcpus", 1)
        return Machine(
            memory_mib=int(memory),
            vcpus=int(vcpus),
            accelerator=accelerator(config.get("accelerator", "auto"))[0],
            kernel=config.get("kernel", str(self.image_dir / "vmlinuz")),
            initramfs=config.get("initramfs", str(self.image_dir / "initramfs.cpio")),
            tsc_khz=tsc_khz(),
        )

    def launch_details(self, config: dict) -> dict:
        chosen, reason = accelerator(config.get("accelerator", "auto"))
        return {"accelerator": chosen, "summary": f"QEMU microvm under {reason}"}

    # QEMU

    def _command(self, spec: LaunchSpec, machine: Machine, vm: VmFiles) -> list[str]:
        """Return QEMU's command line; a restore uses the same one, because the devices must match the snapshot."""
        relay = Path(__file__).with_name("vmrelay.py")
        relay_command = f"{shlex.quote(sys.executable)} -I -S {shlex.quote(str(relay))} {shlex.quote(str(spec.files.api_socket_path))}"
        cmdline = ["console=ttyS0", "quiet", "panic=-1", "rdinit=/init"]
        if machine.tsc_khz:
            cmdline.append(f"tsc_early_khz={machine.tsc_khz}")
        accel = ["-accel", "kvm", "-cpu", "host"] if machine.accelerator == "kvm" else ["-accel", "tcg", "-cpu", "max"]
        return [
            str(self.qemu),
            "-name", f"checker-{spec.job_id}",
            "-M", "microvm",
            *accel,
            "-m", str(machine.memory_mib),
            "-smp", str(machine.vcpus),
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-kernel", machine.kernel,
            "-initrd", machine.initramfs,
            "-append", " ".join(cmdline),
            "-pidfile", str(vm.pid_file),
            "-qmp", f"unix:{qemu_option(str(vm.qmp_socket))},server=on,wait=off",
            "-chardev", f"file,id=console,path={qemu_option(str(vm.console_log))},append=on",
            "-serial", "chardev:console",
            "-device", "virtio-serial-device",
            "-chardev", f"socket,id=control,path={qemu_option(str(vm.control_socket))},server=on,wait=off",
            "-device", "virtserialport,chardev=control,name=checker.control",
            "-chardev", f"file,id=stdout,path={qemu_option(str(spec.files.stdout_path))},append=on",
            "-device", "virtserialport,chardev=stdout,name=checker.stdout",
            "-chardev", f"file,id=stderr,path={qemu_option(str(spec.files.stderr_path))},append=on",
            "-device", "virtserialport,chardev=stderr,name=checker.stderr",
            "-chardev", f"file,id=exit,path={qemu_option(str(vm.exit_port))}",
            "-device", "virtserialport,chardev=exit,name=checker.exit",
            "-netdev", f"user,id=net,restrict=on,guestfwd=tcp:{API_ADDRESS}:{API_PORT}-cmd:{qemu_option(relay_command)}",
            "-device", "virtio-net-device,netdev=net",
        ]

    def _launch(self, spec: LaunchSpec, machine: Machine, vm: VmFiles, extra: list[str], error_code: ErrorCode, context: str) -> ProcessIdentity:
        for path in (machine.kernel, machine.initramfs):
            if not os.path.isfile(path):
                raise CheckerError(error_code, f"{context} failed: {path} is missing; build the guest image with scripts/build-vm-image.sh")
        vm.prepare()
        machine.write(vm.machine)
        spec.files.stdout_path.touch()
        spec.files.stderr_path.touch()
        with open(vm.qemu_log, "ab") as qemu_log:
            qemu_log.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {context}\n".encode())
            qemu_log.flush()
            launcher = subprocess.Popen(
                [*self._command(spec, machine, vm), *extra],
                stdin=subprocess.DEVNULL, stdout=qemu_log, stderr=qemu_log, start_new_session=True, close_fds=True,
            )
        self._launchers[launcher.pid] = launcher
        identity = procfs.identify(launcher.pid)
        if identity is None:
            raise CheckerError(error_code, f"{context} failed: QEMU exited at once; {self._qemu_output(vm)}")
        return identity

    def _qemu_output(self, vm: VmFiles) -> str:
        """Return the last lines of QEMU's output and of the guest console, for error messages."""
        parts = []
        for label, path in (("QEMU", vm.qemu_log), ("guest console", vm.console_log)):
            try:
                lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip() and not line.startswith("---")]
            except FileNotFoundError:
                continue
            if lines:
                parts.append(f"{label}: " + " | ".join(line.strip() for line in lines[-3:]))
        return "; ".join(parts) or f"no output; see {vm.qemu_log}"

    async def _wait_until(self, predicate, process: ProcessIdentity, vm: VmFiles, timeout: float, what: str, error_code: ErrorCode, context: str):
        deadline = time.monotonic() + timeout
        while True:
            result = await predicate()
            if result:
                return result
            if not procfs.is_alive(process):
                raise CheckerError(error_code, f"{context} failed: QEMU exited before {what}; {self._qemu_output(vm)}")
            if time.monotonic() > deadline:
                raise CheckerError(error_code, f"{context} failed: no {what} within {timeout:.0f} s; {self._qemu_output(vm)}")
            await asyncio.sleep(POLL_SECONDS)

    # Guest control port

    async def _talk_to_guest(self, vm: VmFiles, message: Callable[[], dict], payload: bytes, timeout: float, wait_for_ready: bool = False) -> dict:
        """Send one request to the guest init and return its reply.

        `message` is a function that returns the request when it is sent. With
        `wait_for_ready`, that is only after the guest init reports that it booted.
        """
        reader, writer = await asyncio.open_unix_connection(str(vm.control_socket), limit=1 << 20)
        try:
            if wait_for_ready:
                await self._read_reply(reader, timeout, expected="ready")
            writer.write(json.dumps(message()).encode() + b"\n" + payload)
            await writer.drain()
            return await self._read_reply(reader, timeout)
        finally:
            writer.close()

    @staticmethod
    async def _read_reply(reader: asyncio.StreamReader, timeout: float, expected: str | None = None) -> dict:
        line = await asyncio.wait_for(reader.readline(), timeout)
        if not line:
            raise ConnectionError("the guest closed its control port")
        reply = json.loads(line)
        if reply.get("kind") == "error":
            raise RuntimeError(f"the guest init reported: {reply.get('message')}")
        if expected is not None and reply.get("kind") != expected:
            raise RuntimeError(f"the guest init sent {reply.get('kind')!r} where {expected!r} was expected")
        return reply

    def _host_state(self, files: JobFiles) -> dict:
        """Return the time, identity and entropy the guest gets at a launch and at each thaw."""
        try:
            identity = json.loads(files.identity_path.read_text())
        except (FileNotFoundError, ValueError):
            identity = None
        return {"time_ns": time.time_ns(), "identity": identity, "entropy": secrets.token_hex(64)}

    def _launch_archive(self, spec: LaunchSpec) -> bytes:
        """Return a tar archive of the SDK and the definition's files, unpacked at / in the guest."""
        sdk_root = Path(checker.__file__).resolve().parent
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as archive:
            archive.add(sdk_root / "__init__.py", arcname=f"{GUEST_SDK_DIR}/checker/__init__.py")
            archive.add(sdk_root / "sdk", arcname=f"{GUEST_SDK_DIR}/checker/sdk", filter=skip_bytecode)
            for path in self._files_of(spec.config):
                archive.add(path, arcname=str(path).lstrip("/"), filter=skip_bytecode)
        return buffer.getvalue()

    def _guest_environment(self, spec: LaunchSpec) -> dict[str, str]:
        """Return the job's environment in the guest: the definition's and the spawn's variables, without the server host's own."""
        env = {"PATH": GUEST_PATH, "HOME": "/root"}
        for name, value in spec.env.items():
            # Values the server copied from its own environment name host paths.
            if name in INHERITED_ENV and os.environ.get(name) == value:
                continue
            env[name] = value
        env.update({
            "PYTHONPATH": GUEST_SDK_DIR,
            ENV_API_URL: f"http://{API_ADDRESS}:{API_PORT}",
            ENV_IDENTITY_FILE: f"{GUEST_JOB_DIR}/identity.json",
        })
        env.pop("CHECKER_TOKEN", None)  # The identity file contains the token, and a restore replaces it.
        return env

    async def _freeze_job(self, vm: VmFiles, context: str) -> None:
        """Stop every process of the job in the guest, so that the snapshot contains a job that waits for `_thaw_job`."""
        try:
            await self._talk_to_guest(vm, lambda: {"kind": "freeze"}, b"", GUEST_REPLY_SECONDS)
        except (OSError, ValueError, RuntimeError, TimeoutError) as error:
            raise CheckerError(ErrorCode.CHECKPOINT_FAILED, f"{context} failed: the guest init did not stop the job: {error or type(error).__name__}") from error

    async def _thaw_job(self, vm: VmFiles, files: JobFiles, context: str) -> None:
        """Set the guest's clock, identity and entropy, then let the job continue.

        Raise OSError when the guest init sends no reply.
        """
        started = time.time()
        try:
            reply = await self._talk_to_guest(vm, lambda: {"kind": "thaw", **self._host_state(files)}, b"", GUEST_REPLY_SECONDS)
        except (ValueError, RuntimeError, TimeoutError) as error:
            raise OSError(f"the guest init did not set the clock and continue the job: {error or type(error).__name__}") from error
        skew = reply["time_ns"] / 1e9 - started
        logger.info("%s: guest clock set and job continued; the guest's clock differs from the host's by %.3f s", context, skew)

    # The Runtime interface

    async def start(self, spec: LaunchSpec) -> ProcessIdentity:
        context = f"start of job {spec.job_id} (runtime vm)"
        vm = VmFiles.of(spec.files)
        spec.files.exit_status_path.unlink(missing_ok=True)
        machine = self.machine_for(spec.config, spec.limits)
        try:
            archive = self._launch_archive(spec)
        except (OSError, ValueError) as error:
            raise CheckerError(ErrorCode.START_FAILED, f"{context} failed: cannot pack runtime.files: {error}") from error
        process = self._launch(spec, machine, vm, [], ErrorCode.START_FAILED, context)

        def request() -> dict:
            return {"kind": "launch", "command": spec.command, "env": self._guest_environment(spec), "archive_bytes": len(archive), **self._host_state(spec.files)}

        try:
            await self._wait_until(lambda: socket_exists(vm.control_socket), process, vm, 10.0, "the control socket", ErrorCode.START_FAILED, context)
            talk = self._talk_to_guest(vm, request, archive, BOOT_TIMEOUT_SECONDS, wait_for_ready=True)
            reply = await asyncio.wait_for(talk, BOOT_TIMEOUT_SECONDS + 5)
        except CheckerError:
            procfs.kill_if_alive(process)
            raise
        except (OSError, ValueError, RuntimeError, TimeoutError) as error:
            procfs.kill_if_alive(process)
            raise CheckerError(ErrorCode.START_FAILED, f"{context} failed: the guest did not start the job: {error or type(error).__name__}; {self._qemu_output(vm)}") from error
        logger.info("job %s: guest started the job as guest PID %s (%s)", spec.job_id, reply.get("pid"), machine.accelerator)
        return process

    async def checkpoint(self, spec: LaunchSpec, process: ProcessIdentity, image_dir: Path, *, leave_running: bool, log_path: Path, context: str) -> None:
        vm = VmFiles.of(spec.files)
        if job_has_exited(vm) or not procfs.is_alive(process):
            raise CheckerError(ErrorCode.CHECKPOINT_FAILED, f"{context} failed: the job's command has already exited")
        memory = image_dir / MEMORY_NAME
        try:
            machine = Machine.read(vm.machine)
            qmp = await Qmp.connect(vm.qmp_socket)
        except (OSError, ValueError, RuntimeError, TimeoutError) as error:
            raise CheckerError(ErrorCode.CHECKPOINT_FAILED, f"{context} failed: cannot reach QEMU: {error}") from error
        saved = False
        try:
            await self._freeze_job(vm, context)
            await self._stop_without_connections(qmp, context)
            await self._save(qmp, memory, log_path, process, vm, context)
            machine.write(image_dir / MACHINE_NAME)
            saved = True
        except (OSError, RuntimeError, TimeoutError) as error:
            raise CheckerError(ErrorCode.CHECKPOINT_FAILED, f"{context} failed: {error}") from error
        finally:
            if saved and not leave_running:
                # Not QMP `quit`, because QEMU may reset the connection before its reply.
                procfs.kill_if_alive(process)
            else:
                await self._continue(qmp, vm, spec.files, process, context)
            await qmp.close()

    async def _continue(self, qmp: Qmp, vm: VmFiles, files: JobFiles, process: ProcessIdentity, context: str) -> None:
        """Continue the VM and thaw the job.

        When QEMU or the guest init sends no reply, kill the VM, so that the runner restores the job.
        """
        try:
            await qmp.execute("cont")
            await self._thaw_job(vm, files, context)
        except (OSError, RuntimeError, TimeoutError) as error:
            logger.error("%s: %s; killing the VM so that the job is restored from its last checkpoint", context, error)
            procfs.kill_if_alive(process)

    async def _stop_without_connections(self, qmp: Qmp, context: str) -> None:
        """Stop the VM at a moment when the guest has no connection to the server open.

        The server has closed the job's socket, so each connection ends within
        milliseconds, but its last packets reach the guest only while the VM
        runs. A snapshot taken before that would hold a connection that a
        restored VM's user network has forgotten, and the job would wait
        for a response forever.
        """
        for _ in range(STOP_ATTEMPTS):
            await qmp.execute("stop")
            table = await qmp.execute("human-monitor-command", {"command-line": "info usernet"})
            if not open_api_connections(str(table)):
                return
            await qmp.execute("cont")
            await asyncio.sleep(POLL_SECONDS)
        raise CheckerError(ErrorCode.CHECKPOINT_FAILED, f"{context} failed: the guest kept a connection to the server open for {STOP_ATTEMPTS * POLL_SECONDS:.0f} s after its socket closed")

    async def _save(self, qmp: Qmp, memory: Path, log_path: Path, process: ProcessIdentity, vm: VmFiles, context: str) -> None:
        """Migrate the stopped VM into `memory` through zstd, and wait until the file is complete."""
        partial = memory.with_name(memory.name + ".partial")
        partial.unlink(missing_ok=True)
        memory.unlink(missing_ok=True)
        compress = f"zstd -q --fast=1 -T2 > {shlex.quote(str(partial))} && mv {shlex.quote(str(partial))} {shlex.quote(str(memory))}"
        started = time.monotonic()
        # QEMU 7.2 limits migration to 32 MiB/s unless max-bandwidth is set.
        await qmp.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40})
        await qmp.execute("migrate", {"uri": f"exec:{compress}"})

        async def finished() -> dict | None:
            status = await qmp.execute("query-migrate")
            return status if status.get("status") in ("completed", "failed", "cancelled") else None

        status = await self._wait_until(finished, process, vm, SAVE_TIMEOUT_SECONDS, "the end of the save", ErrorCode.CHECKPOINT_FAILED, context)
        if status["status"] != "completed":
            raise CheckerError(ErrorCode.CHECKPOINT_FAILED, f"{context} failed: QEMU's save ended {status['status']}: {status.get('error-desc', 'no reason given')}")

        async def written() -> bool:
            return memory.exists()

        await self._wait_until(written, process, vm, 60.0, f"complete {memory.name}", ErrorCode.CHECKPOINT_FAILED, context)
        append_log(log_path, f"saved {status.get('ram', {}).get('total', 0)} bytes of guest RAM into {memory} ({memory.stat().st_size} bytes) in {time.monotonic() - started:.3f} s")

    async def restore(self, spec: LaunchSpec, image_dir: Path, *, log_path: Path, context: str, leave_stopped: bool = False) -> ProcessIdentity:
        memory = image_dir / MEMORY_NAME
        try:
            machine = Machine.read(image_dir / MACHINE_NAME)
        except ValueError as error:
            raise CheckerError(ErrorCode.RESTORE_FAILED, f"{context} failed: {error}") from None
        if not memory.is_file():
            raise CheckerError(ErrorCode.RESTORE_FAILED, f"{context} failed: {memory} is missing")
        if machine.accelerator == "kvm" and accelerator()[0] != "kvm":
            raise CheckerError(ErrorCode.RESTORE_FAILED, f"{context} failed: the snapshot was taken under KVM, which this machine cannot run; restore it on a machine with KVM")
        wanted = self.machine_for(spec.config, spec.limits)
        if (wanted.memory_mib, wanted.vcpus) != (machine.memory_mib, machine.vcpus):
            logger.warning(
                "%s: the snapshot's guest has %d MiB and %d vCPUs; a snapshot restores only into the same machine, so the job's limits of %d MiB and %d vCPUs do not apply",
                context, machine.memory_mib, machine.vcpus, wanted.memory_mib, wanted.vcpus,
            )
        spec.files.exit_status_path.unlink(missing_ok=True)
        vm = VmFiles.of(spec.files)
        process = self._launch(spec, machine, vm, ["-S", "-incoming", f"exec:zstd -q -dc {shlex.quote(str(memory))}"], ErrorCode.RESTORE_FAILED, context)
        try:
            await self._load(spec, process, vm, log_path, context)
        except BaseException:
            procfs.kill_if_alive(process)
            raise
        if not leave_stopped:
            await self.resume(process)
        return process

    async def _load(self, spec: LaunchSpec, process: ProcessIdentity, vm: VmFiles, log_path: Path, context: str) -> None:
        """Wait until QEMU has read the whole snapshot; the image files may go once this returns."""
        started = time.monotonic()
        try:
            qmp = await Qmp.connect(vm.qmp_socket)
        except (OSError, ValueError, TimeoutError) as error:
            raise CheckerError(ErrorCode.RESTORE_FAILED, f"{context} failed: cannot reach QEMU: {error}; {self._qemu_output(vm)}") from error
        try:
            async def loaded() -> str | None:
                status = (await qmp.execute("query-status")).get("status")
                return None if status == "inmigrate" else status

            status = await self._wait_until(loaded, process, vm, SAVE_TIMEOUT_SECONDS, "the end of the load", ErrorCode.RESTORE_FAILED, context)
        except (OSError, RuntimeError, TimeoutError) as error:
            raise CheckerError(ErrorCode.RESTORE_FAILED, f"{context} failed: {error}; {self._qemu_output(vm)}") from error
        finally:
            await qmp.close()
        if status != "paused":
            raise CheckerError(ErrorCode.RESTORE_FAILED, f"{context} failed: QEMU is {status!r} after loading the snapshot, not paused; {self._qemu_output(vm)}")
        append_log(log_path, f"loaded the snapshot in {time.monotonic() - started:.3f} s")

    async def resume(self, process: ProcessIdentity) -> None:
        vm = vm_files_of(process)
        if vm is None:
            return
        files = JobFiles.under(vm.directory.parent)
        context = f"resume of job in {files.job_dir}"
        try:
            qmp = await Qmp.connect(vm.qmp_socket)
        except (OSError, ValueError, TimeoutError) as error:
            logger.error("%s: cannot reach QEMU: %s; killing the VM so that the job is restored from its last checkpoint", context, error)
            procfs.kill_if_alive(process)
            return
        # Also a re-adopted VM gets `cont` and a thaw: a server that died
        # during a checkpoint may have left it stopped, or its job frozen.
        try:
            await self._continue(qmp, vm, files, process, context)
        finally:
            await qmp.close()

    async def discard_interrupted_restore(self, spec: LaunchSpec, keep: ProcessIdentity | None) -> int | None:
        vm = VmFiles.of(spec.files)
        try:
            pid = int(vm.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        current = procfs.identify(pid)
        if current is None or (keep is not None and current == keep):
            return None
        found = vm_files_of(current)
        if found is None or found.directory != vm.directory:
            return None  # The PID now belongs to another process.
        await self.kill(current)
        return current.pid

    async def kill(self, process: ProcessIdentity) -> None:
        procfs.kill_if_alive(process)

    async def wait(self, spec: LaunchSpec, process: ProcessIdentity) -> ExitStatus:
        wait_status = await procfs.wait_for_exit(process)
        self._launchers.pop(process.pid, None)
        vm = VmFiles.of(spec.files)
        copy_exit_status(vm, spec.files)
        return read_exit_status(spec.files, wait_status)

    async def cleanup(self, spec: LaunchSpec) -> None:
        vm = VmFiles.of(spec.files)
        for path in (vm.qmp_socket, vm.control_socket, vm.exit_port, vm.pid_file):
            path.unlink(missing_ok=True)


def physical_memory_mib() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >> 20
    except (OSError, ValueError):
        return None


def reject_memory_above_host(label: str, memory_mib: int) -> None:
    """Raise ValueError when a guest of `memory_mib` MiB would not fit in this machine's RAM."""
    available = physical_memory_mib()
    if available is not None and memory_mib > available:
        raise ValueError(f"{label} {memory_mib} is more than this machine's {available} MiB of RAM; give a smaller guest")


def open_api_connections(table: str) -> list[str]:
    """Return the rows of QEMU's `info usernet` table for API connections whose end the guest has not seen yet.

    A connection in TIME_WAIT, FIN_WAIT_2 or the closing states is over for
    the guest, because it received the end or closed first. One in
    ESTABLISHED, SYN_RCVD or FIN_WAIT_1 may still wait for data or for the end.
    """
    waiting = ("TCP[SYN_SENT]", "TCP[SYN_RCVD]", "TCP[ESTABLISHED]", "TCP[FIN_WAIT_1]")
    return [row.strip() for row in table.splitlines() if row.strip().startswith(waiting) and f" {API_ADDRESS} " in row]


def append_log(path: Path, line: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as log_file:
        log_file.write(line + "\n")


def qemu_option(value: str) -> str:
    """Escape a value for a QEMU option list, where a comma separates options and ",," is a literal comma."""
    return value.replace(",", ",,")


def skip_bytecode(member: tarfile.TarInfo) -> tarfile.TarInfo | None:
    if "__pycache__" in member.name.split("/"):
        return None
    member.uid = member.gid = 0
    member.uname = member.gname = "root"
    return member


def tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(child.stat().st_size for child in path.rglob("*") if child.is_file())


async def socket_exists(path: Path) -> bool:
    return path.exists()


def job_has_exited(vm: VmFiles) -> bool:
    try:
        return vm.exit_port.stat().st_size > 0
    except FileNotFoundError:
        return False


def copy_exit_status(vm: VmFiles, files: JobFiles) -> None:
    """Turn what the guest wrote to its exit port into the job's exit-status file, which the runner reads."""
    try:
        text = vm.exit_port.read_text().strip().splitlines()
    except FileNotFoundError:
        return
    if not text:
        return
    try:
        status = json.loads(text[0])
    except ValueError:
        logger.warning("job in %s: the guest's exit status %r is not JSON", files.job_dir, text[0][:200])
        return
    staging = files.exit_status_path.with_suffix(".tmp")
    staging.write_text(json.dumps(status) + "\n")
    os.replace(staging, files.exit_status_path)


def vm_files_of(process: ProcessIdentity) -> VmFiles | None:
    """Find the VM files of a running QEMU from its command line (also after a server restart)."""
    try:
        arguments = Path(f"/proc/{process.pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except (FileNotFoundError, ProcessLookupError):
        return None
    for option, value in zip(arguments, arguments[1:]):
        if option == "-pidfile":
            return VmFiles(Path(value).parent)
    return None
