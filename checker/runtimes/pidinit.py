"""Minimal init that runs as PID 1 of a job's PID namespace.

Run as `python -I -S pidinit.py STDOUT STDERR EXIT_STATUS WORKDIR -- COMMAND...`.
It uses only builtin modules and no `site`, so it adds little to every image.

PID 1 of a namespace ignores every signal it has no handler for, SIGTERM
included, and inherits every orphan in the namespace. So the job itself must
not be PID 1: this init starts it as a child, forwards termination signals to
it, reaps orphans, and when the job ends writes the job's exit status to
EXIT_STATUS (atomically) before exiting with the same status. The server reads
that file because after a server restart the job is no longer its child and
waitpid() cannot report the status.
"""

import os
import signal
import sys

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def open_log(path):
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)


def redirect_standard_streams(stdout_path, stderr_path):
    """Open the log files here, inside the namespace, in append mode.

    CRIU restores a regular file only if its size still matches, except for
    O_APPEND files; pipes or a terminal from the launcher would come back
    unconnected after a restore.
    """
    stdin = os.open(os.devnull, os.O_RDONLY)
    stdout = open_log(stdout_path)
    stderr = open_log(stderr_path)
    for target, source in ((0, stdin), (1, stdout), (2, stderr)):
        os.dup2(source, target)
        os.close(source)


def write_exit_status(path, status):
    """Write `exit_code` or `signal` as JSON, replacing the file atomically."""
    if os.WIFSIGNALED(status):
        text = '{"signal": %d}\n' % os.WTERMSIG(status)
    else:
        text = '{"exit_code": %d}\n' % os.waitstatus_to_exitcode(status)

    temporary = path + ".tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(temporary, path)


def main(argv):
    if len(argv) < 7 or argv[5] != "--":
        sys.stderr.write("usage: pidinit.py STDOUT STDERR EXIT_STATUS WORKDIR -- COMMAND...\n")
        return 2
    stdout_path, stderr_path, exit_status_path, workdir = argv[1:5]
    command = argv[6:]

    if os.getsid(0) != os.getpid():  # bwrap --new-session made this process a session leader already.
        os.setsid()
    redirect_standard_streams(stdout_path, stderr_path)
    os.closerange(3, 1 << 16)
    os.chdir(workdir)

    child = os.fork()
    if child == 0:
        for number in FORWARDED_SIGNALS:
            signal.signal(number, signal.SIG_DFL)
        try:
            os.execvp(command[0], command)
        except OSError as error:
            os.write(2, ("checker: cannot execute %r: %s\n" % (command[0], error)).encode())
            os._exit(127)

    def forward(number, frame):
        try:
            os.kill(child, number)
        except ProcessLookupError:
            pass

    for number in FORWARDED_SIGNALS:
        signal.signal(number, forward)

    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return 0
        except InterruptedError:
            continue
        if pid == child:
            write_exit_status(exit_status_path, status)
            if os.WIFSIGNALED(status):
                return 128 + os.WTERMSIG(status)
            return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
