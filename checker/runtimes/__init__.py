"""Runtimes: how a job is started, checkpointed, restored and stopped."""

from checker.runtimes.base import ExitStatus, JobFiles, LaunchSpec, Runtime
from checker.runtimes.cgroups import Limits
from checker.runtimes.container import ContainerRuntime
from checker.runtimes.criu import Criu, find_criu
from checker.runtimes.podman import PodmanRuntime
from checker.runtimes.process import ProcessRuntime
from checker.runtimes.sandbox import SandboxRuntime

RUNTIME_TYPES = ("process", "sandbox", "container", "podman")


def create_runtimes(criu: Criu, criu_timeout_seconds: float) -> dict[str, Runtime]:
    """Build one instance of every runtime available on this machine, by type name."""
    return {
        "process": ProcessRuntime(criu, criu_timeout_seconds),
        "sandbox": SandboxRuntime(criu, criu_timeout_seconds),
        "container": ContainerRuntime(criu, criu_timeout_seconds),
        "podman": PodmanRuntime(criu, criu_timeout_seconds),
    }


__all__ = ["Criu", "ExitStatus", "JobFiles", "LaunchSpec", "Limits", "RUNTIME_TYPES", "Runtime", "create_runtimes", "find_criu"]
