#!/usr/bin/env python3
"""Test helper run inside network namespaces by redirect/tests/traffic.rs.

  capture_probe.py listen PORT [PORT...]   accept on each port; for every connection print
                                           "accepted <port> <original destination>" and close
  capture_probe.py connect HOST PORT [MARK] connect (optionally with SO_MARK), send "hi",
                                           print what the peer answered
"""
import socket
import struct
import sys
import threading

SO_ORIGINAL_DST = 80
SO_MARK = 36


def original_dst(conn):
    try:
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port, addr = struct.unpack("!2xH4s8x", raw)
        return f"{socket.inet_ntoa(addr)}:{port}"
    except OSError:
        return "none"


def serve(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(16)
    while True:
        conn, _ = s.accept()
        line = f"accepted {port} {original_dst(conn)}"
        print(line, flush=True)
        try:
            conn.sendall(line.encode())
        finally:
            conn.close()


def main():
    if sys.argv[1] == "listen":
        ports = [int(p) for p in sys.argv[2:]]
        for p in ports[1:]:
            threading.Thread(target=serve, args=(p,), daemon=True).start()
        print("ready", flush=True)
        serve(ports[0])
    else:
        host, port = sys.argv[2], int(sys.argv[3])
        s = socket.socket()
        if len(sys.argv) > 4:
            s.setsockopt(socket.SOL_SOCKET, SO_MARK, int(sys.argv[4], 0))
        s.settimeout(5)
        s.connect((host, port))
        s.sendall(b"hi")
        print(s.recv(200).decode(), flush=True)


if __name__ == "__main__":
    main()
