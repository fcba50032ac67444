"""Init of a `vm` job's guest: PID 1 inside the QEMU microVM.

`scripts/build-vm-image.sh` installs this file as /init of the guest's
initramfs. It uses only the standard library of the guest's Python and talks
to the host through three virtio-serial ports:

    checker.control   requests from the host and replies, one JSON object per line
    checker.stdout    the job's standard output (a log file on the host)
    checker.stderr    the job's standard error
    checker.exit      the job's exit status, written once, as JSON

Boot: mount the kernel file systems, load the virtio modules listed in
MODULE_ORDER, give eth0 its user-networking address, send `ready` on the
control port and wait there for the host's `launch` request: the job's command, environment,
identity, the wall-clock time and a tar archive of files (the SDK and the
definition's files). The init unpacks the files, starts the job and replies
`started`.

Before each snapshot the host sends `freeze`, and the init stops every
process of the job. After the snapshot, and after each restore, the host sends
`thaw` with the current time, the job's identity and fresh entropy: the guest
clock stood still while the snapshot waited, a fork has a new identity, and a
restored guest would otherwise reuse the random state it had at the
checkpoint. The init sets the clock, replaces the identity file, mixes the
entropy into the kernel's pool, lets the job continue and replies with the
guest's new time.

When the job exits, the init writes its status to `checker.exit` and
powers the VM off; QEMU runs with `-no-reboot`, so it exits too.
"""

import ctypes
import errno
import fcntl
import io
import json
import os
import select
import signal
import socket
import struct
import sys
import tarfile
import threading
import time
import traceback

MODULE_DIR = "/usr/lib/checker-modules"
MODULE_ORDER = MODULE_DIR + "/order"
JOB_DIR = "/run/checker/job"
IDENTITY_PATH = JOB_DIR + "/identity.json"
WORK_DIR = JOB_DIR + "/work"
GUEST_ADDRESS = "10.0.2.15"
GUEST_NETMASK = "255.255.255.0"
PORT_WAIT_SECONDS = 30.0
HOST_POLL_SECONDS = 0.05
"""How often to look for the host while no host process is connected to the control port."""

SYS_FINIT_MODULE = 313
RB_AUTOBOOT = 0x01234567
SIOCSIFADDR = 0x8916
SIOCSIFNETMASK = 0x891C
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207

libc = ctypes.CDLL(None, use_errno=True)


def log(message):
    """Write to the serial console, which the host keeps as the VM's console log."""
    sys.stderr.write("checker-init: %s\n" % message)
    sys.stderr.flush()


def mount(source, target, kind, options=None):
    os.makedirs(target, exist_ok=True)
    data = options.encode() if options else None
    if libc.mount(source.encode(), target.encode(), kind.encode(), 0, data) != 0:
        code = ctypes.get_errno()
        if code != errno.EBUSY:
            raise OSError(code, "mount %s on %s: %s" % (kind, target, os.strerror(code)))


def load_modules():
    """Load the virtio drivers in dependency order; the build script wrote that order."""
    try:
        with open(MODULE_ORDER) as order:
            names = [line.strip() for line in order if line.strip()]
    except FileNotFoundError:
        return
    for name in names:
        descriptor = os.open(os.path.join(MODULE_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
        try:
            if libc.syscall(SYS_FINIT_MODULE, descriptor, b"", 0) != 0:
                code = ctypes.get_errno()
                if code != errno.EEXIST:
                    raise OSError(code, "loading module %s: %s" % (name, os.strerror(code)))
        finally:
            os.close(descriptor)


def interface_request(name, payload=b""):
    return struct.pack("16s", name.encode()) + payload.ljust(24, b"\0")


def address_request(name, address):
    sockaddr = struct.pack("<H", socket.AF_INET) + b"\0\0" + socket.inet_aton(address)
    return interface_request(name, sockaddr)


def bring_up(name, address=None):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as control:
        if address is not None:
            fcntl.ioctl(control, SIOCSIFADDR, address_request(name, address))
            fcntl.ioctl(control, SIOCSIFNETMASK, address_request(name, GUEST_NETMASK))
        flags = struct.unpack_from("H", fcntl.ioctl(control, SIOCGIFFLAGS, interface_request(name)), 16)[0]
        fcntl.ioctl(control, SIOCSIFFLAGS, interface_request(name, struct.pack("H", flags | IFF_UP)))


def find_ports(names):
    """Return {name: device path} of the virtio-serial ports, waiting until all of them exist."""
    deadline = time.monotonic() + PORT_WAIT_SECONDS
    while True:
        found = {}
        try:
            for entry in os.listdir("/sys/class/virtio-ports"):
                with open("/sys/class/virtio-ports/%s/name" % entry) as name_file:
                    found[name_file.read().strip()] = "/dev/" + entry
        except FileNotFoundError:
            pass
        if all(name in found and os.path.exists(found[name]) for name in names):
            return found
        if time.monotonic() > deadline:
            raise RuntimeError("virtio-serial ports %s did not appear; found %s" % (", ".join(names), found))
        time.sleep(0.02)


class ControlPort:
    """The control port: JSON lines, read whenever the host is connected."""

    def __init__(self, path):
        self.descriptor = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self.buffer = b""

    def read_exactly(self, size):
        while len(self.buffer) < size:
            self.fill()
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def read_message(self):
        while b"\n" not in self.buffer:
            self.fill()
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def fill(self):
        # Without a host on the other end, read() returns 0 at once and poll()
        # reports a hang-up, so wait a little before looking again.
        ready = select.select([self.descriptor], [], [], 1.0)[0]
        chunk = os.read(self.descriptor, 1 << 16) if ready else b""
        if chunk:
            self.buffer += chunk
        else:
            time.sleep(HOST_POLL_SECONDS)

    def send(self, message):
        data = (json.dumps(message) + "\n").encode()
        while data:
            try:
                data = data[os.write(self.descriptor, data) :]
            except OSError as error:
                if error.errno not in (errno.EAGAIN, errno.ENODEV, errno.EPIPE):
                    raise
                time.sleep(HOST_POLL_SECONDS)


class Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def set_clock(time_ns):
    value = Timespec(time_ns // 1_000_000_000, time_ns % 1_000_000_000)
    if libc.clock_settime(0, ctypes.byref(value)) != 0:  # CLOCK_REALTIME
        code = ctypes.get_errno()
        raise OSError(code, "clock_settime: %s" % os.strerror(code))


def add_entropy(data):
    """Mix `data` into the kernel's pool, credit it, and reseed the random number generator now."""
    if not data:
        return
    request = struct.pack("ii", len(data) * 8, len(data)) + data
    with open("/dev/urandom", "wb") as device:
        fcntl.ioctl(device, RNDADDENTROPY, request)
        fcntl.ioctl(device, RNDRESEEDCRNG)


def write_identity(identity):
    os.makedirs(JOB_DIR, exist_ok=True)
    staging = IDENTITY_PATH + ".tmp"
    descriptor = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as identity_file:
        json.dump(identity, identity_file)
    os.rename(staging, IDENTITY_PATH)


def unpack_files(control, size):
    """Unpack the launch request's tar archive at /; the host built it from trusted paths."""
    if size:
        with tarfile.open(fileobj=io.BytesIO(control.read_exactly(size))) as archive:
            archive.extractall("/")


def apply_host_state(request):
    """Apply the time, identity and entropy that a `launch` or `thaw` request contains."""
    set_clock(int(request["time_ns"]))
    if request.get("identity"):
        write_identity(request["identity"])
    add_entropy(bytes.fromhex(request.get("entropy", "")))


def start_job(request, ports):
    os.makedirs(WORK_DIR, exist_ok=True)
    stdin = os.open(os.devnull, os.O_RDONLY)
    stdout = os.open(ports["checker.stdout"], os.O_WRONLY)
    stderr = os.open(ports["checker.stderr"], os.O_WRONLY)
    environment = dict(request["env"])
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            for target, source in ((0, stdin), (1, stdout), (2, stderr)):
                os.dup2(source, target)
            os.closerange(3, 1 << 16)
            os.chdir(WORK_DIR)
            os.execvpe(request["command"][0], request["command"], environment)
        except OSError as error:
            os.write(2, ("checker-init: cannot run %s: %s\n" % (request["command"][0], error)).encode())
            os._exit(127)
    for descriptor in (stdin, stdout, stderr):
        os.close(descriptor)
    return pid


def signal_job(signal_number):
    """Send a signal to every process of the guest but this init: the job and anything it started."""
    try:
        os.kill(-1, signal_number)
    except ProcessLookupError:
        pass  # The job has exited.


def serve_control(control):
    """Serve the host's requests for as long as the VM runs.

    `freeze` stops every process of the job before a snapshot. `thaw` sets
    the clock, identity and entropy and then lets the job continue, so the
    job never reads the stale clock or identity of a restored snapshot.
    """
    while True:
        request = control.read_message()
        kind = request.get("kind")
        try:
            if kind == "freeze":
                signal_job(signal.SIGSTOP)
            elif kind == "thaw":
                apply_host_state(request)
                signal_job(signal.SIGCONT)
            else:
                raise ValueError("unknown request %r" % kind)
        except (OSError, ValueError, KeyError) as error:
            control.send({"kind": "error", "message": str(error)})
            continue
        control.send({"kind": "done", "time_ns": time.time_ns()})


def exit_status_text(status):
    if os.WIFSIGNALED(status):
        return '{"signal": %d}\n' % os.WTERMSIG(status)
    return '{"exit_code": %d}\n' % os.waitstatus_to_exitcode(status)


def wait_for_job(job_pid):
    """Reap every child until the job itself ends; return its wait status."""
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return None
        except InterruptedError:
            continue
        if pid == job_pid:
            return status


def power_off(ports, status):
    if status is not None:
        descriptor = os.open(ports["checker.exit"], os.O_WRONLY)
        os.write(descriptor, exit_status_text(status).encode())
        os.close(descriptor)
    os.sync()
    libc.reboot(RB_AUTOBOOT)  # QEMU runs with -no-reboot, so a reboot ends it.
    while True:
        time.sleep(60)


def main():
    for signal_number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signal_number, signal.SIG_IGN)
    mount("proc", "/proc", "proc")
    mount("sysfs", "/sys", "sysfs")
    mount("devtmpfs", "/dev", "devtmpfs")
    mount("tmpfs", "/tmp", "tmpfs", "mode=1777")
    mount("tmpfs", "/run", "tmpfs", "mode=755")
    load_modules()
    bring_up("lo", "127.0.0.1")
    bring_up("eth0", GUEST_ADDRESS)

    ports = find_ports(("checker.control", "checker.stdout", "checker.stderr", "checker.exit"))
    control = ControlPort(ports["checker.control"])
    # The host sends the launch request, with the time, only once the guest
    # has booted; a boot under TCG takes seconds.
    control.send({"kind": "ready"})
    request = control.read_message()
    if request.get("kind") != "launch":
        raise RuntimeError("expected a launch request, got %r" % request.get("kind"))
    unpack_files(control, int(request.get("archive_bytes", 0)))
    apply_host_state(request)
    job_pid = start_job(request, ports)
    control.send({"kind": "started", "pid": job_pid, "time_ns": time.time_ns()})

    threading.Thread(target=serve_control, args=(control,), daemon=True).start()
    power_off(ports, wait_for_job(job_pid))


if __name__ == "__main__":
    try:
        main()
    except BaseException as error:  # PID 1 must not exit: the kernel would panic.
        log("failed: %r" % (error,))
        traceback.print_exc()
        os.sync()
        libc.reboot(RB_AUTOBOOT)
