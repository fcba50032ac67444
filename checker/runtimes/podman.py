"""The `podman` runtime: each job in a podman container from a local image, checkpointed by podman.

Podman 4.3.1 checkpoints here only with runc as its OCI runtime (Debian 12's
crun is built without CRIU) and the cgroupfs cgroup manager, so Checker
passes both. Podman finds CRIU on PATH, so Checker puts CRIU's directory
first there. The job's
container looks like a `container` job's (oci.py): pidinit.py as PID 1, the
job directory at /run/checker/job, the SDK at /run/checker/sdk, the host's
network, and a read-only root, here the image's.

A checkpoint is `podman container checkpoint --export` into the checkpoint's
image directory, as one uncompressed tar archive, so the checkpoint store
hashes and verifies it. As with runc, the container's `org.criu.config`
annotation names a CRIU configuration file. Podman runs runc with an
environment of its own, so the action script that archives the work
directory is written per dump with its paths inside it.

Podman restores a container's bind mounts from the exported configuration,
so a restored copy mounts the job directory of the job that made the image.
A restore into another job (a fork, or a fork's restore from the
checkpoint it was forked from) imports a copy of the archive. The copy's OCI
spec mounts the restoring job's directory at /run/checker/job and names a
CRIU configuration file of that job's own. The source job's archive and
files stay unchanged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

from checker.errors import CheckerError, ErrorCode
from checker.runtimes import oci, procfs, worksnapshot
from checker.runtimes.base import ExitStatus, LaunchSpec, read_exit_status
from checker.runtimes.cgroups import read_oom_kill_count
from checker.runtimes.container import BUNDLES_DIR, DUMP_CRIU_OPTIONS, RESTORE_CRIU_OPTIONS, ContainerRuntime, container_prefix, new_container_id, write_criu_config
from checker.runtimes.criu import MAX_ERROR_LINES, run_watched
from checker.runtimes.process import ProcessRuntime, check_image_fits_bytes, put_back_work_dir
from checker.runtimes.procfs import ProcessIdentity

logger = logging.getLogger(__name__)

PODMAN_OPTIONS = ["--runtime", "runc", "--cgroup-manager", "cgroupfs"]
EXPORT_NAME = "podman-checkpoint.tar"
"""File name of podman's exported checkpoint inside a checkpoint's image directory."""
CRIU_CONFIG_ANNOTATION = "org.criu.config"
SPEC_FILES = ("config.dump", "spec.dump")
"""Files of podman's exported checkpoint that contain the container's OCI spec: config.dump under its "spec" key."""
PODMAN_TIMEOUT_SECONDS = 60.0
MAX_PROCESSES_LIMIT = 32768
"""Highest RLIMIT_NPROC podman 4.3.1 could give a container here: it lowers its own to 32768, and runc fails above it."""

ALLOWED_KEYS = (oci.ALLOWED_KEYS - {"rootfs"}) | {"image"}

PODMAN_WORKING_DIR = BUNDLES_DIR
"""Working directory of podman and its conmon processes, which write an "oom" file there after an OOM kill."""


def find_podman() -> str | None:
    return shutil.which("podman")


def export_path(image_dir: Path) -> Path:
    return image_dir / EXPORT_NAME


def exported_memory_bytes(archive_path: Path) -> int:
    """Return the size of the memory pages in podman's exported checkpoint."""
    with tarfile.open(archive_path) as archive:
        return sum(member.size for member in archive.getmembers() if Path(member.name).name.startswith("pages-") and member.name.endswith(".img"))


def exported_spec(archive_path: Path) -> dict:
    """Return the OCI configuration (spec.dump) stored in podman's exported checkpoint."""
    with tarfile.open(archive_path) as archive:
        member = archive.extractfile("spec.dump")
        if member is None:
            raise KeyError("spec.dump")
        return json.load(member)


def job_mount_sources(spec: dict) -> list[str]:
    """Return the host directories that an OCI spec mounts at the job directory's path inside the container."""
    return [mount.get("source") for mount in spec.get("mounts", []) if mount.get("destination") == str(oci.JOB_MOUNT)]


def retarget_spec(spec: dict, job_dir: Path, criu_config: Path) -> None:
    """Point an OCI spec's job directory mount at `job_dir` and its CRIU configuration annotation at `criu_config`."""
    for mount in spec.get("mounts", []):
        if mount.get("destination") == str(oci.JOB_MOUNT):
            mount["source"] = str(job_dir)
    spec.setdefault("annotations", {})[CRIU_CONFIG_ANNOTATION] = str(criu_config)


def retarget_export(archive_path: Path, target_path: Path, job_dir: Path, criu_config: Path) -> None:
    """Copy podman's exported checkpoint to `target_path`, with both of its OCI specs retargeted to another job.

    Podman 4.3.1 reads the spec of the container it restores from both
    config.dump and spec.dump, so both are rewritten. Every other member,
    CRIU's image files included, is copied unchanged.
    """
    target_path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive_path) as archive, tarfile.open(target_path, "w", format=archive.format) as target:
        for member in archive:
            content = archive.extractfile(member) if member.isfile() else None
            if member.name in SPEC_FILES and content is not None:
                document = json.load(content)
                retarget_spec(document["spec"] if member.name == "config.dump" else document, job_dir, criu_config)
                encoded = json.dumps(document).encode()
                member.size = len(encoded)
                content = io.BytesIO(encoded)
            target.addfile(member, content)


class PodmanRuntime(ContainerRuntime):
    """Jobs in podman containers from images in podman's local storage, checkpointed with podman and CRIU."""

    type_name = "podman"
    allowed_config_keys = ALLOWED_KEYS

    def validate_config(self, config: dict) -> None:
        image = config.get("image")
        if not isinstance(image, str) or not image:
            raise ValueError("runtime.image is missing; set it to the name of an image in podman's local storage, e.g. localhost/etl:latest")
        oci.validate_container_config(config, runtime_name="podman", allowed_keys=ALLOWED_KEYS)

        podman = find_podman()
        if podman is None:
            raise ValueError("runtime.type 'podman' needs podman, which is not installed here; install it with scripts/install-podman.sh")
        completed = subprocess.run([podman, *PODMAN_OPTIONS, "image", "exists", image], capture_output=True, text=True, timeout=PODMAN_TIMEOUT_SECONDS)
        if completed.returncode != 0:
            raise ValueError(f"runtime.image {image!r} is not in podman's local storage; pull, build or import it first (podman images lists what is there)")

    def _podman(self, code: ErrorCode, job_id: str) -> str:
        podman = find_podman()
        if podman is None:
            raise CheckerError(code, f"job {job_id}: podman is not installed; the podman runtime needs it (install it with scripts/install-podman.sh)")
        return podman

    def _env(self) -> dict[str, str]:
        """Return podman's environment: CRIU's directory first on PATH, because podman and runc look for `criu` there."""
        return {"PATH": f"{self.criu.path.parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"}

    async def _run_podman(self, podman: str, *arguments: str, timeout: float = PODMAN_TIMEOUT_SECONDS) -> subprocess.CompletedProcess:
        BUNDLES_DIR.mkdir(parents=True, exist_ok=True)
        return await asyncio.to_thread(
            subprocess.run,
            [podman, *PODMAN_OPTIONS, *arguments],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **self._env()},
            cwd=PODMAN_WORKING_DIR,
        )

    def _run_arguments(self, spec: LaunchSpec, name: str, criu_config: Path) -> list[str]:
        config = spec.config
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        processes = min(resource.getrlimit(resource.RLIMIT_NPROC)[0], MAX_PROCESSES_LIMIT)
        arguments = [
            "run", "--detach", "--name", name, "--network", "host", "--read-only",
            "--annotation", f"{CRIU_CONFIG_ANNOTATION}={criu_config}",
            # Podman fails the start unless both limits are given, and given at or below its own.
            "--ulimit", f"nofile={soft}:{hard}", "--ulimit", f"nproc={processes}:{processes}",
            "--volume", f"{spec.files.job_dir}:{oci.JOB_MOUNT}", "--volume", f"{oci.SDK_PACKAGE}:{oci.SDK_MOUNT / 'checker'}:ro",
            "--workdir", str(oci.INSIDE.work_dir),
        ]
        for text in config.get("mounts") or []:
            mount = oci.parse_mount(text)
            arguments += ["--volume", f"{mount.source}:{mount.target}:{'rw' if mount.writable else 'ro'}"]
        for name_and_value in sorted(oci.container_env(spec.env, config).items()):
            arguments += ["--env", "=".join(name_and_value)]
        limits = spec.limits
        if limits.memory_mib is not None:
            arguments += ["--memory", f"{limits.memory_mib}m", "--memory-swap", f"{limits.memory_mib}m"]
        if limits.cpu_cores is not None:
            arguments += ["--cpus", str(limits.cpu_cores)]
        if limits.pids is not None:
            arguments += ["--pids-limit", str(limits.pids)]

        python = config.get("python", oci.DEFAULT_PYTHON)
        init_arguments = oci.bundle_config(spec.job_id, spec.files.job_dir, spec.command, {}, {**config, "rootfs": "/"}, limits, criu_config)["process"]["args"]
        arguments += ["--entrypoint", json.dumps([python]), config["image"], *init_arguments[1:]]
        return arguments

    async def start(self, spec: LaunchSpec) -> ProcessIdentity:
        podman = self._podman(ErrorCode.START_FAILED, spec.job_id)
        spec.files.work_dir.mkdir(parents=True, exist_ok=True)
        spec.files.exit_status_path.unlink(missing_ok=True)

        name = new_container_id(spec.job_id)
        criu_config = BUNDLES_DIR / name / "criu.conf"
        write_criu_config(criu_config, DUMP_CRIU_OPTIONS)
        completed = await self._run_podman(podman, *self._run_arguments(spec, name, criu_config))
        if completed.returncode != 0:
            await self._remove(podman, name)
            raise CheckerError(ErrorCode.START_FAILED, f"start of job {spec.job_id} failed: podman run exited with {completed.returncode}: {completed.stderr.strip()}")

        init = await self._init_of(podman, name)
        if init is None:
            raise CheckerError(ErrorCode.START_FAILED, f"start of job {spec.job_id} failed: the container's init exited at once; see {spec.files.stderr_path}")
        self._containers[init.pid] = name
        logger.info("job %s: started podman container %s, init PID %d", spec.job_id, name, init.pid)
        return init

    async def _init_of(self, podman: str, name: str) -> ProcessIdentity | None:
        completed = await self._run_podman(podman, "inspect", "--format", "{{.State.Pid}}", name)
        try:
            pid = int(completed.stdout.strip())
        except ValueError:
            return None
        return procfs.identify(pid) if pid > 0 else None

    async def checkpoint(self, spec: LaunchSpec, process: ProcessIdentity, image_dir: Path, *, leave_running: bool, log_path: Path, context: str) -> None:
        podman = self._podman(ErrorCode.CHECKPOINT_FAILED, spec.job_id)
        command_process = self._job_command(process)
        if command_process is None or spec.files.exit_status_path.exists():
            raise CheckerError(ErrorCode.CHECKPOINT_FAILED, f"{context} failed: the job's command has already exited")
        name = await self._find_container(podman, spec.job_id, process.pid)
        if name is None:
            raise CheckerError(ErrorCode.CHECKPOINT_FAILED, f"{context} failed: no podman container of job {spec.job_id} has init PID {process.pid}")

        criu_config = await self._criu_config_of(podman, name, context)
        script = criu_config.with_name("snapshot.sh")
        write_snapshot_script(script, spec.files.work_dir, image_dir / worksnapshot.SNAPSHOT_NAME)
        write_criu_config(criu_config, [*DUMP_CRIU_OPTIONS, f"action-script {script}"])

        arguments = ["container", "checkpoint", "--export", str(export_path(image_dir)), "--compress", "none"]
        if leave_running:
            arguments.append("--leave-running")

        def init_exiting() -> str | None:
            return "the job's process died during the dump" if procfs.is_exiting(process) else None

        await self._run_checkpoint_command(podman, [*arguments, name], log_path, ErrorCode.CHECKPOINT_FAILED, context, abandon_when=init_exiting)
        if leave_running and (spec.files.exit_status_path.exists() or not procfs.is_alive(command_process)):
            raise CheckerError(ErrorCode.CHECKPOINT_FAILED, f"{context} failed: the job's command exited during the dump, so the image is incomplete")

    async def _criu_config_of(self, podman: str, name: str, context: str) -> Path:
        """Return the CRIU configuration file the container's annotation names: that of the job's first container, which restores keep."""
        completed = await self._run_podman(podman, "inspect", "--format", "{{ index .Config.Annotations \"org.criu.config\" }}", name)
        path = completed.stdout.strip()
        if completed.returncode != 0 or not path.startswith("/"):
            raise CheckerError(ErrorCode.CHECKPOINT_FAILED, f"{context} failed: podman container {name} has no org.criu.config annotation ({completed.stderr.strip()})")
        return Path(path)

    async def _run_checkpoint_command(self, podman: str, arguments: list[str], log_path: Path, code: ErrorCode, context: str, **options) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        BUNDLES_DIR.mkdir(parents=True, exist_ok=True)
        run = await run_watched([podman, *PODMAN_OPTIONS, *arguments], timeout=self.criu_timeout_seconds, env=self._env(), cwd=PODMAN_WORKING_DIR, **options)
        log_path.write_text(run.stderr + "\n")
        if run.abandoned is not None:
            raise CheckerError(code, f"{context} failed: {run.abandoned}, so podman was stopped")
        if run.returncode != 0:
            lines = [line for line in run.stderr.splitlines() if line][:MAX_ERROR_LINES]
            raise CheckerError(code, f"{context} failed: podman exited with {run.returncode} and reported {'; '.join(lines) or 'nothing'} (log: {log_path})")

    async def restore(self, spec: LaunchSpec, image_dir: Path, *, log_path: Path, context: str, leave_stopped: bool = False) -> ProcessIdentity:
        podman = self._podman(ErrorCode.RESTORE_FAILED, spec.job_id)
        archive = export_path(image_dir)
        try:
            check_image_fits_bytes(spec, exported_memory_bytes(archive), context)
            exported = exported_spec(archive)
        except (OSError, KeyError, ValueError, tarfile.TarError) as error:
            raise CheckerError(ErrorCode.RESTORE_FAILED, f"{context} failed: cannot read podman's checkpoint {archive}: {error}") from error

        sources = job_mount_sources(exported)
        if len(sources) != 1:
            raise CheckerError(
                ErrorCode.RESTORE_FAILED,
                f"{context} failed: podman's checkpoint {archive} mounts {len(sources)} directories at {oci.JOB_MOUNT}, "
                "where exactly one is expected; the image was not made by Checker's podman runtime",
            )

        name = new_container_id(spec.job_id)
        imported = archive
        criu_config = Path(exported.get("annotations", {}).get(CRIU_CONFIG_ANNOTATION, ""))
        if sources[0] != str(spec.files.job_dir):
            imported, criu_config = await self._retarget(spec, archive, name, sources[0], context)

        await put_back_work_dir(spec, image_dir, context)
        write_criu_config(criu_config, [*RESTORE_CRIU_OPTIONS, *(["leave-stopped"] if leave_stopped else [])])
        try:
            await self._run_checkpoint_command(podman, ["container", "restore", "--import", str(imported), "--name", name], log_path, ErrorCode.RESTORE_FAILED, context)
        finally:
            if imported != archive:
                imported.unlink(missing_ok=True)
        init = await self._init_of(podman, name)
        if init is None:
            raise CheckerError(ErrorCode.RESTORE_FAILED, f"{context} failed: the restored container {name} exited at once; see {spec.files.stderr_path}")
        self._containers[init.pid] = name
        return init

    async def _retarget(self, spec: LaunchSpec, archive: Path, name: str, source_job_dir: str, context: str) -> tuple[Path, Path]:
        """Write a copy of another job's archive that mounts this job's directory, and return its path and the CRIU configuration path it names."""
        bundle = BUNDLES_DIR / name
        imported = bundle / EXPORT_NAME
        criu_config = bundle / "criu.conf"
        try:
            await asyncio.to_thread(retarget_export, archive, imported, spec.files.job_dir, criu_config)
        except (OSError, KeyError, ValueError, tarfile.TarError) as error:
            imported.unlink(missing_ok=True)
            raise CheckerError(ErrorCode.RESTORE_FAILED, f"{context} failed: cannot copy podman's checkpoint {archive} to {imported} for this job: {error}") from error
        logger.info("job %s: %s imports a copy of podman's checkpoint with %s mounted in place of %s", spec.job_id, context, spec.files.job_dir, source_job_dir)
        return imported, criu_config

    async def discard_interrupted_restore(self, spec: LaunchSpec, keep: ProcessIdentity | None) -> int | None:
        podman = find_podman()
        if podman is None:
            return None
        killed = None
        for container in await self._list_podman(podman, spec.job_id):
            pid = container.get("Pid") or 0
            if keep is not None and pid == keep.pid:
                continue
            identity = procfs.identify(pid) if pid > 0 else None
            if identity is not None:
                await self.kill(identity)
                killed = killed or pid
            await self._remove(podman, container["Names"][0])
        return killed

    async def wait(self, spec: LaunchSpec, process: ProcessIdentity) -> ExitStatus:
        podman = find_podman()
        name = self._containers.get(process.pid)
        if name is None and podman is not None:
            name = await self._find_container(podman, spec.job_id, process.pid)

        memory_cgroup = self._memory_cgroup_of(process.pid)
        wait_status = await procfs.wait_for_exit(process)
        status = read_exit_status(spec.files, wait_status)
        self._containers.pop(process.pid, None)

        # podman 4.3.1's OOMKilled stays false here (conmon writes its "oom" file
        # to its working directory), so the container's own cgroup is read.
        killed_by_kernel = status.signal == signal.SIGKILL or not status.reported
        if killed_by_kernel and memory_cgroup is not None and read_oom_kill_count(memory_cgroup / "memory.oom_control") > 0:
            status = dataclasses.replace(status, out_of_memory=True)
        if name is not None and podman is not None:
            await self._remove(podman, name)
        return status

    def _memory_cgroup_of(self, pid: int) -> Path | None:
        """Return the v1 memory cgroup directory of process `pid`, or None (cgroup v2, or the process is gone)."""
        mount = self.cgroup_layout.v1_mounts.get("memory")
        try:
            lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        except (FileNotFoundError, ProcessLookupError):
            return None
        for line in lines:
            _, controllers, path = line.split(":", 2)
            if mount is not None and "memory" in controllers.split(","):
                return mount / path.lstrip("/")
        return None

    async def cleanup(self, spec: LaunchSpec) -> None:
        podman = find_podman()
        if podman is not None:
            for container in await self._list_podman(podman, spec.job_id):
                await self._remove(podman, container["Names"][0])
        for directory in BUNDLES_DIR.glob(f"{container_prefix(spec.job_id)}*"):
            shutil.rmtree(directory, ignore_errors=True)
        await ProcessRuntime.cleanup(self, spec)

    async def _list_podman(self, podman: str, job_id: str) -> list[dict]:
        prefix = container_prefix(job_id)
        completed = await self._run_podman(podman, "ps", "--all", "--format", "json", "--filter", f"name=^{prefix}")
        if completed.returncode != 0:
            logger.error("job %s: podman ps failed: %s", job_id, completed.stderr.strip())
            return []
        return [container for container in json.loads(completed.stdout or "[]") if container["Names"][0].startswith(prefix)]

    async def _find_container(self, podman: str, job_id: str, pid: int) -> str | None:
        known = self._containers.get(pid)
        if known is not None:
            return known
        for container in await self._list_podman(podman, job_id):
            if container.get("Pid") == pid:
                self._containers[pid] = container["Names"][0]
                return container["Names"][0]
        return None

    async def _remove(self, podman: str, name: str) -> None:
        """Remove the container; its CRIU configuration stays, because restored copies of it still name that file."""
        completed = await self._run_podman(podman, "rm", "--force", "--time", "0", name)
        if completed.returncode != 0 and "no such container" not in completed.stderr:
            logger.error("podman rm of container %s failed: %s", name, completed.stderr.strip())


def write_snapshot_script(path: Path, work_dir: Path, target: Path) -> None:
    """Write the action script of one dump, with the work directory and archive paths inside it."""
    snapshot_module = Path(worksnapshot.__file__)
    text = (
        "#!/bin/sh\n"
        '[ "$CRTOOLS_SCRIPT_ACTION" = "post-dump" ] || exit 0\n'
        f"export {worksnapshot.ENV_WORK_DIR}={shlex.quote(str(work_dir))} {worksnapshot.ENV_SNAPSHOT}={shlex.quote(str(target))}\n"
        f"exec {shlex.quote(sys.executable)} -I -S {shlex.quote(str(snapshot_module))}\n"
    )
    staging = path.with_suffix(".tmp")
    staging.write_text(text)
    staging.chmod(0o755)
    os.replace(staging, path)

