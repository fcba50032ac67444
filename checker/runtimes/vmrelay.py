"""Connect a `vm` job's forwarded TCP connection to the job's unix socket.

QEMU's user network starts `python -I -S vmrelay.py SOCKET` for each
connection the guest opens to the API address, with the connection on
standard input and output. This relays bytes both ways until either side
closes. When the server does not listen on SOCKET, because it is
checkpointing the job, the relay exits at once. The guest's connection then
closes, and the SDK retries.
"""

import os
import select
import socket
import sys

BUFFER_BYTES = 1 << 16


def relay(server):
    open_directions = {0: server.fileno(), server.fileno(): 1}
    while open_directions:
        readable = select.select(list(open_directions), [], [])[0]
        for source in readable:
            data = os.read(source, BUFFER_BYTES)
            target = open_directions[source]
            if not data:
                del open_directions[source]
                if target == server.fileno():
                    server.shutdown(socket.SHUT_WR)
                else:
                    return  # The server sent its response and closed, so the request is done.
                continue
            while data:
                data = data[os.write(target, data) :]


def main(argv):
    if len(argv) != 2:
        sys.stderr.write("usage: vmrelay.py SOCKET\n")
        return 2
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.connect(argv[1])
    except OSError:
        return 1
    try:
        relay(server)
    except OSError:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
