#!/usr/bin/env python3
"""vu-trace.py LISTEN BACKEND LOG — a logging vhost-user proxy, for looking at what QEMU says.

QEMU connects to the unix socket LISTEN; for each connection the proxy connects to the
backend's socket BACKEND (retrying for up to 60 s, so a backend being restarted is waited
for) and forwards every message both ways, with the file descriptors passed along them
(SCM_RIGHTS). When either side closes, the other side is closed too (QEMU with
`reconnect=N` then reconnects to LISTEN), and the proxy waits for the next connection.
One connection to the backend per connection from QEMU, made only after QEMU connected:
the backend sees the same connections it would see without the proxy.

Each message is decoded into LOG, one line each:

    12.345 c1 > SET_VRING_BASE idx=0 num=0
    12.346 c1 < GET_VRING_BASE idx=0 num=57 (reply)

`>` is QEMU → backend (requests), `<` backend → QEMU (replies); c1, c2... number the
connections; times are seconds since the proxy started. Decoded payloads: ring state
(SET_VRING_NUM / SET_VRING_BASE / GET_VRING_BASE / SET_VRING_ENABLE: index, num), the u64
of feature and queue-number messages, the ring index and no-fd bit of SET_VRING_KICK /
CALL / ERR, SET_STATUS, the region count of SET_MEM_TABLE, GET_CONFIG's offset and size.
Stops on SIGTERM/SIGINT. Only the Python 3 standard library.
"""

import os
import signal
import socket
import struct
import sys
import threading
import time

REQUESTS = {
    1: "GET_FEATURES", 2: "SET_FEATURES", 3: "SET_OWNER", 4: "RESET_OWNER",
    5: "SET_MEM_TABLE", 6: "SET_LOG_BASE", 7: "SET_LOG_FD", 8: "SET_VRING_NUM",
    9: "SET_VRING_ADDR", 10: "SET_VRING_BASE", 11: "GET_VRING_BASE", 12: "SET_VRING_KICK",
    13: "SET_VRING_CALL", 14: "SET_VRING_ERR", 15: "GET_PROTOCOL_FEATURES",
    16: "SET_PROTOCOL_FEATURES", 17: "GET_QUEUE_NUM", 18: "SET_VRING_ENABLE",
    19: "SEND_RARP", 20: "NET_SET_MTU", 21: "SET_SLAVE_REQ_FD", 22: "IOTLB_MSG",
    23: "SET_VRING_ENDIAN", 24: "GET_CONFIG", 25: "SET_CONFIG", 28: "POSTCOPY_ADVISE",
    29: "POSTCOPY_LISTEN", 30: "POSTCOPY_END", 31: "GET_INFLIGHT_FD", 32: "SET_INFLIGHT_FD",
    34: "RESET_DEVICE", 35: "VRING_KICK", 36: "GET_MAX_MEM_SLOTS", 37: "ADD_MEM_REG",
    38: "REM_MEM_REG", 39: "SET_STATUS", 40: "GET_STATUS",
}
RING_STATE = {8, 10, 11, 18}  # struct vhost_vring_state { u32 index; u32 num; }
U64 = {1, 2, 15, 16, 17, 36, 39, 40}
RING_FD = {12, 13, 14}  # u64: ring index in bits 0-7, bit 8 = no fd
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
MAX_FDS = 16

T0 = time.monotonic()
log_lock = threading.Lock()
log_file = None


def log(line):
    with log_lock:
        log_file.write("%.3f %s\n" % (time.monotonic() - T0, line))
        log_file.flush()


def decode(req, flags, payload, nfds):
    name = REQUESTS.get(req, "REQUEST_%d" % req)
    parts = [name]
    if req in RING_STATE and len(payload) >= 8:
        idx, num = struct.unpack_from("<II", payload)
        parts.append("idx=%d num=%d" % (idx, num))
    elif req in U64 and len(payload) >= 8:
        (v,) = struct.unpack_from("<Q", payload)
        parts.append("0x%x" % v if req in (1, 2, 15, 16) else "%d" % v)
    elif req in RING_FD and len(payload) >= 8:
        (v,) = struct.unpack_from("<Q", payload)
        parts.append("idx=%d%s" % (v & 0xFF, " nofd" if v & 0x100 else ""))
    elif req == 5 and len(payload) >= 4:
        (n,) = struct.unpack_from("<I", payload)
        parts.append("regions=%d" % n)
    elif req in (24, 25) and len(payload) >= 12:
        off, size, _ = struct.unpack_from("<III", payload)
        parts.append("offset=%d size=%d" % (off, size))
    elif payload:
        parts.append("(%d bytes)" % len(payload))
    if nfds:
        parts.append("fds=%d" % nfds)
    if flags & FLAG_REPLY:
        parts.append("(reply)")
    if flags & FLAG_NEED_REPLY:
        parts.append("(need_reply)")
    return " ".join(parts)


def recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def pump(src, dst, conn, arrow, done):
    """Forwards whole messages src → dst until either side closes."""
    try:
        while True:
            hdr, fds, _, _ = socket.recv_fds(src, 12, MAX_FDS)
            if not hdr:
                break
            if len(hdr) < 12:
                rest = recv_exact(src, 12 - len(hdr))
                if rest is None:
                    break
                hdr += rest
            req, flags, size = struct.unpack("<III", hdr)
            payload = recv_exact(src, size) if size else b""
            if payload is None:
                break
            log("c%d %s %s" % (conn, arrow, decode(req, flags, payload, len(fds))))
            msg = hdr + payload
            sent = socket.send_fds(dst, [msg], fds) if fds else dst.send(msg)
            if sent < len(msg):
                dst.sendall(msg[sent:])
            for fd in fds:
                os.close(fd)
    except OSError as e:
        log("c%d %s error: %s" % (conn, arrow, e))
    finally:
        if not done.is_set():
            done.set()
            log("c%d closed by %s" % (conn, "QEMU" if arrow == ">" else "the backend"))
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def connect_backend(path, conn):
    deadline = time.monotonic() + 60
    waited = False
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            if waited:
                log("c%d backend up again" % conn)
            return s
        except OSError:
            s.close()
            if time.monotonic() > deadline:
                return None
            if not waited:
                log("c%d backend not listening: waiting" % conn)
                waited = True
            time.sleep(0.05)


def main():
    global log_file
    if len(sys.argv) != 4:
        sys.exit("usage: vu-trace.py LISTEN BACKEND LOG")
    listen, backend, logpath = sys.argv[1:]
    log_file = open(logpath, "a", encoding="utf-8")
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    try:
        os.unlink(listen)
    except FileNotFoundError:
        pass
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(listen)
    srv.listen(4)
    log("listening on %s, backend %s" % (listen, backend))
    conn = 0
    while True:
        client, _ = srv.accept()
        conn += 1
        log("c%d QEMU connected" % conn)
        back = connect_backend(backend, conn)
        if back is None:
            log("c%d no backend on %s after 60 s: closing" % (conn, backend))
            client.close()
            continue
        done = threading.Event()
        threads = [
            threading.Thread(target=pump, args=(client, back, conn, ">", done), daemon=True),
            threading.Thread(target=pump, args=(back, client, conn, "<", done), daemon=True),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        client.close()
        back.close()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
