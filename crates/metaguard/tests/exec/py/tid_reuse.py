"""Connects from threads that reuse one thread id (F12, supervisor cache).

Run as root of a new user and PID namespace: /proc/sys/kernel/ns_last_pid
is set so the next thread gets the id of one that exited. Every connect is
a seccomp notification under `metaguard exec`; the supervisor keeps a
pidfd per thread id, which must never stand for a new thread with an old
id. Prints one JSON line: how many threads reused the id, and errors.
"""
import json
import os
import socket
import threading
import time

srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(64)
port = srv.getsockname()[1]
errors = []


def connect(tids, pad):
    tids.append(threading.get_native_id())
    # Shift the socket's descriptor number from round to round.
    spare = [socket.socket() for _ in range(pad)]
    try:
        s = socket.socket()
        s.settimeout(5)
        s.connect(("127.0.0.1", port))
        peer, _ = srv.accept()
        peer.close()
        s.close()
    except OSError as e:
        errors.append(f"{type(e).__name__}: {e}")
    for x in spare:
        x.close()


def released(tid):
    """Waits (5 s at most) until thread id `tid` is free again: a joined
    thread's id is released only when the kernel reaps the thread, a little
    after the join returns (much later on a loaded machine)."""
    for _ in range(5000):
        if not os.path.exists(f"/proc/self/task/{tid}"):
            return
        time.sleep(0.001)


def in_thread(pad):
    tids = []
    t = threading.Thread(target=connect, args=(tids, pad))
    t.start()
    t.join()
    return tids[0]


first = in_thread(0)
reused = 0
# Eight reuses, in 128 rounds at most. A round can miss: on a loaded
# machine the id may not be free yet, and under `metaguard exec` the
# supervisor grows its worker pool (threads in this PID namespace, 64 at
# most) when its workers are busy, and a new worker can take the id first.
# A miss proves nothing either way, so it is retried rather than counted.
for i in range(1, 129):
    released(first)
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(first - 1))
    if in_thread(i % 9 + 1) == first:
        reused += 1
        if reused == 8:
            break
print(json.dumps({"reused": reused, "errors": errors}))
