"""Real clients against the lab's metadata endpoints, for `metaguard exec`.

Usage: clients.py RUNID CREDENTIALS_RELATIVE_URI

Run inside a lab network namespace (refuses the root one). Each probe gets
two seconds at most and reports "ok" (it reached the endpoint and got an
answer) or what failed. Markers "MGPROBE RUNID-<probe>" / the header
x-lab-probe let the test ask the emulators whether anything arrived.
Prints one JSON object on the last line.
"""

import errno
import http.client
import json
import os
import select
import socket
import sys
import tempfile
import time

IMDS4 = "169.254.169.254"
IMDS6 = "fd00:ec2::254"
AGENT = "169.254.170.2"
SCRUBBED = [
    "ECS_CONTAINER_METADATA_URI",
    "ECS_CONTAINER_METADATA_URI_V4",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
]
INIT_NET_INO = 0xEFFFFFF9


def refuse_root_netns():
    me = os.stat("/proc/self/ns/net").st_ino
    try:
        init = os.stat("/proc/1/ns/net").st_ino
    except OSError:
        init = None
    if me == INIT_NET_INO or me == init:
        raise SystemExit("refusing to run in the root network namespace")


def err(e):
    if isinstance(e, OSError) and e.errno:
        return "err:" + errno.errorcode.get(e.errno, str(e.errno))
    return "err:" + type(e).__name__


def probe(fn):
    t = time.monotonic()
    try:
        r = fn()
    except Exception as e:  # noqa: BLE001 - every failure is a result
        r = err(e)
    return r, round(time.monotonic() - t, 3)


def tcp(family, addr, port, marker, blocking=True):
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        if blocking:
            s.settimeout(2)
            s.connect((addr, port))
        else:
            s.setblocking(False)
            rc = s.connect_ex((addr, port))
            if rc not in (0, errno.EINPROGRESS):
                raise OSError(rc, os.strerror(rc))
            _, w, _ = select.select([], [s], [], 2)
            if not w:
                return "err:timeout"
            rc = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if rc:
                raise OSError(rc, os.strerror(rc))
            s.setblocking(True)
            s.settimeout(2)
        s.sendall(f"MGPROBE {marker}\n".encode())
        return "ok" if s.recv(100).startswith(b"MGPROBE") else "err:noecho"
    finally:
        s.close()


def udp(family, addr, port, marker, how):
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.settimeout(1)
    try:
        data = f"MGPROBE {marker}\n".encode()
        if how == "sendto":
            s.sendto(data, (addr, port))
        elif how == "sendmsg":
            s.sendmsg([data], [], 0, (addr, port))
        else:
            s.connect((addr, port))
            s.send(data)
        got, _ = s.recvfrom(100)
        return "ok" if got.startswith(b"MGPROBE") else "err:noecho"
    finally:
        s.close()


def http_get(host, path, marker):
    c = http.client.HTTPConnection(host, 80, timeout=2)
    try:
        c.request("GET", path, headers={"x-lab-probe": marker})
        r = c.getresponse()
        r.read()
        return f"ok:{r.status}"
    finally:
        c.close()


def botocore_imds():
    from botocore.utils import InstanceMetadataFetcher

    f = InstanceMetadataFetcher(
        timeout=1, num_attempts=1, base_url=f"http://{IMDS4}", env={}
    )
    creds = f.retrieve_iam_role_credentials()
    return "ok" if creds.get("access_key") else "err:no-credentials"


def botocore_container(rel):
    from botocore.utils import ContainerMetadataFetcher

    f = ContainerMetadataFetcher(sleep=lambda _s: None)
    doc = f.retrieve_uri(rel)
    return "ok" if doc.get("AccessKeyId") else "err:no-credentials"


def botocore_container_env():
    from botocore.credentials import ContainerProvider
    from botocore.utils import ContainerMetadataFetcher

    p = ContainerProvider(
        environ=dict(os.environ), fetcher=ContainerMetadataFetcher(sleep=lambda _s: None)
    )
    creds = p.load()
    return "ok" if creds is not None else "none"


def loopback():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    c = socket.create_connection(srv.getsockname(), timeout=2)
    a, _ = srv.accept()
    c.sendall(b"hi")
    ok = a.recv(2) == b"hi"
    for s in (a, c, srv):
        s.close()
    return "ok" if ok else "err:loopback"


def unix_fds():
    a, b = socket.socketpair()
    r, w = os.pipe()
    socket.send_fds(a, [b"x"], [w])
    msg, fds, _, _ = socket.recv_fds(b, 10, 4)
    os.write(fds[0], b"through")
    got = os.read(r, 7)
    for fd in (r, w, *fds):
        os.close(fd)
    a.close()
    b.close()
    return "ok" if msg == b"x" and got == b"through" else "err:fds"


def unix_relative():
    d = tempfile.mkdtemp(prefix="mg-exec-")
    old = os.getcwd()
    os.chdir(d)
    try:
        srv = socket.socket(socket.AF_UNIX)
        srv.bind("s.sock")
        srv.listen(1)
        c = socket.socket(socket.AF_UNIX)
        c.connect("s.sock")
        a, _ = srv.accept()
        c.sendall(b"u")
        ok = a.recv(1) == b"u"
        for s in (a, c, srv):
            s.close()
        return "ok" if ok else "err:unix"
    finally:
        os.chdir(old)
        try:
            os.unlink(os.path.join(d, "s.sock"))
        except OSError:
            pass
        os.rmdir(d)


def parent_environ():
    try:
        with open(f"/proc/{os.getppid()}/environ", "rb") as f:
            data = f.read()
    except OSError as e:
        return err(e)
    leaked = [n for n in SCRUBBED if n.encode() in data or b"secret-" in data]
    return "leaked:" + ",".join(leaked) if leaked else "readable-clean"


def main():
    refuse_root_netns()
    run, rel = sys.argv[1], sys.argv[2]
    m = lambda p: f"{run}-{p}"  # noqa: E731
    probes = {
        "tcp_v4": lambda: tcp(socket.AF_INET, IMDS4, 8080, m("tcp_v4")),
        "tcp_v6": lambda: tcp(socket.AF_INET6, IMDS6, 8080, m("tcp_v6")),
        "tcp_mapped": lambda: tcp(
            socket.AF_INET6, "::ffff:" + IMDS4, 8080, m("tcp_mapped")
        ),
        "tcp_nonblocking": lambda: tcp(
            socket.AF_INET, IMDS4, 8080, m("tcp_nonblocking"), blocking=False
        ),
        "udp_sendto": lambda: udp(socket.AF_INET, IMDS4, 5353, m("udp_sendto"), "sendto"),
        "udp_sendmsg": lambda: udp(
            socket.AF_INET, IMDS4, 5353, m("udp_sendmsg"), "sendmsg"
        ),
        "udp6_sendto_mapped": lambda: udp(
            socket.AF_INET6, "::ffff:" + IMDS4, 5353, m("udp6_sendto_mapped"), "sendto"
        ),
        "udp_connect": lambda: udp(
            socket.AF_INET, IMDS4, 5353, m("udp_connect"), "connect"
        ),
        "http_imds": lambda: http_get(
            IMDS4, "/latest/meta-data/instance-id", m("http_imds")
        ),
        "http_agent": lambda: http_get(AGENT, rel, m("http_agent")),
        "botocore_imds": botocore_imds,
        "botocore_container": lambda: botocore_container(rel),
        "botocore_container_env": botocore_container_env,
        "gateway_tcp": lambda: tcp(socket.AF_INET, "10.0.0.1", 8080, m("gateway_tcp")),
        "loopback": loopback,
        "unix_fds": unix_fds,
        "unix_relative": unix_relative,
        "parent_environ": parent_environ,
    }
    # Import botocore before any probe is timed: its import alone takes
    # 0.3-0.7 s on a loaded machine and would read as a slow failure (F14).
    import botocore.credentials  # noqa: F401
    import botocore.utils  # noqa: F401

    out = {}
    for name, fn in probes.items():
        r, secs = probe(fn)
        out[name] = r
        out[name + "_secs"] = secs
    out["env_seen"] = sorted(n for n in SCRUBBED if n in os.environ)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
