"""Runtimes: how a job is started, checkpointed, restored and stopped."""

from pathlib import Path

from checker.runtimes.base import ExitStatus, JobFiles, LaunchSpec, Runtime
from checker.runtimes.cgroups import Limits
from checker.runtimes.container import ContainerRuntime
from checker.runtimes.criu import Criu, find_criu
from checker.runtimes.gvisor import GVisorRuntime, find_runsc
from checker.runtimes.podman import PodmanRuntime
from checker.runtimes.process import ProcessRuntime
from checker.runtimes.sandbox import SandboxRuntime
from checker.runtimes.vm import VmRuntime, find_qemu

RUNTIME_TYPES = ("process", "sandbox", "container", "podman", "gvisor", "vm")


def create_runtimes(criu: Criu, criu_timeout_seconds: float, state_dir: Path | None = None) -> dict[str, Runtime]:
    """Build one instance of every runtime available on this machine, by type name.

    The `gvisor` runtime is available when runsc is found and `state_dir` is
    given; it keeps its sandboxes' files under `state_dir/gvisor`. The `vm`
    runtime is available when QEMU's x86 system emulator is found.
    """
    runtimes: dict[str, Runtime] = {
        "process": ProcessRuntime(criu, criu_timeout_seconds),
        "sandbox": SandboxRuntime(criu, criu_timeout_seconds),
        "container": ContainerRuntime(criu, criu_timeout_seconds),
        "podman": PodmanRuntime(criu, criu_timeout_seconds),
    }
    runsc = find_runsc()
    if runsc is not None and state_dir is not None:
        runtimes["gvisor"] = GVisorRuntime(runsc, state_dir / "gvisor")
    qemu = find_qemu()
    if qemu is not None:
        runtimes["vm"] = VmRuntime(qemu)
    return runtimes


__all__ = ["Criu", "ExitStatus", "JobFiles", "LaunchSpec", "Limits", "RUNTIME_TYPES", "Runtime", "create_runtimes", "find_criu"]
