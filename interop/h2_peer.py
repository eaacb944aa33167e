#!/usr/bin/env python3
"""An independent HBONE peer (Python ssl + the pure-Python `h2` package) for interop tests.

It shares no code with the Rust crates: TLS is OpenSSL through Python's ssl module, HTTP/2 is
hyper-h2. Usage:

  h2_peer.py client --to HOST:PORT --authority AUTH --cert C --key K --ca CA [--expect-san URI]
      Opens one CONNECT tunnel, sends stdin, half-closes, prints the status line
      "status=NNN" on stderr and the received bytes on stdout. Exit 0 on 200 and a clean end.
  h2_peer.py server --listen HOST:PORT --cert C --key K --ca CA
      Serves HBONE: answers 400 to anything but a CONNECT with an ip:port authority, otherwise 200;
      reads the client's bytes to END_STREAM, answers them upper-cased and ends the stream.
      Prints "ready" on stdout once listening and one "stream peer=... authority=..." line per
      tunnel.
"""

import argparse
import socket
import ssl
import sys
import threading

import h2.config
import h2.connection
import h2.events


def tls_context(server_side, cert, key, ca):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    if not server_side:
        ctx.check_hostname = False  # SPIFFE certificates carry URI SANs, checked below
    ctx.set_alpn_protocols(["h2"])
    return ctx


def uri_sans(sock):
    cert = sock.getpeercert()
    return [value for kind, value in cert.get("subjectAltName", ()) if kind == "URI"]


def split_hostport(text):
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def flush(sock, conn):
    data = conn.data_to_send()
    if data:
        sock.sendall(data)


def client(args):
    ctx = tls_context(False, args.cert, args.key, args.ca)
    raw = socket.create_connection(split_hostport(args.to))
    sock = ctx.wrap_socket(raw)  # no server_hostname: no SNI, as HBONE needs none
    if sock.selected_alpn_protocol() != "h2":
        print("server did not select h2", file=sys.stderr)
        return 2
    if args.expect_san and args.expect_san not in uri_sans(sock):
        print(f"server SANs {uri_sans(sock)} lack {args.expect_san}", file=sys.stderr)
        return 2
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    stream = conn.get_next_available_stream_id()
    conn.send_headers(stream, [(":method", "CONNECT"), (":authority", args.authority)])
    flush(sock, conn)
    payload = sys.stdin.buffer.read()
    sent = False
    status = None
    received = bytearray()
    while True:
        data = sock.recv(65536)
        if not data:
            print("connection closed early", file=sys.stderr)
            return 1
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                status = dict(event.headers)[b":status"].decode()
                print(f"status={status}", file=sys.stderr)
                if status != "200":
                    return 1
            elif isinstance(event, h2.events.DataReceived):
                received += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                sys.stdout.buffer.write(bytes(received))
                sys.stdout.buffer.flush()
                return 0 if sent else 1
            elif isinstance(event, h2.events.StreamReset):
                print(f"stream reset: {event.error_code}", file=sys.stderr)
                return 1
        if status == "200" and not sent:
            # Send within the flow-control window; the payloads here are small.
            conn.send_data(stream, payload, end_stream=True)
            sent = True
        flush(sock, conn)


def serve_connection(sock, peer):
    try:
        if sock.selected_alpn_protocol() != "h2":
            return
        sans = uri_sans(sock)
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        conn.initiate_connection()
        flush(sock, conn)
        buffers = {}
        while True:
            data = sock.recv(65536)
            if not data:
                return
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    headers = dict(event.headers)
                    authority = headers.get(":authority", "")
                    ok = headers.get(":method") == "CONNECT" and authority.count(":") >= 1
                    try:
                        split_hostport(authority)
                    except ValueError:
                        ok = False
                    status = "200" if ok else "400"
                    conn.send_headers(event.stream_id, [(":status", status)], end_stream=not ok)
                    print(f"stream peer={sans[0] if sans else '-'} authority={authority} status={status}", flush=True)
                    if ok:
                        buffers[event.stream_id] = bytearray()
                elif isinstance(event, h2.events.DataReceived):
                    if event.stream_id in buffers:
                        buffers[event.stream_id] += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    body = bytes(buffers.pop(event.stream_id, b"")).upper()
                    conn.send_data(event.stream_id, body, end_stream=True)
            flush(sock, conn)
    except (OSError, h2.exceptions.ProtocolError):
        return
    finally:
        sock.close()


def server(args):
    ctx = tls_context(True, args.cert, args.key, args.ca)
    listener = socket.create_server(split_hostport(args.listen))
    print("ready", flush=True)
    while True:
        raw, peer = listener.accept()
        try:
            sock = ctx.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as e:
            print(f"refused peer={peer} error={e}", flush=True)
            raw.close()
            continue
        threading.Thread(target=serve_connection, args=(sock, peer), daemon=True).start()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("client")
    c.add_argument("--to", required=True)
    c.add_argument("--authority", required=True)
    c.add_argument("--expect-san")
    s = sub.add_parser("server")
    s.add_argument("--listen", required=True)
    for p in (c, s):
        p.add_argument("--cert", required=True)
        p.add_argument("--key", required=True)
        p.add_argument("--ca", required=True)
    args = parser.parse_args()
    sys.exit(client(args) if args.mode == "client" else server(args))


if __name__ == "__main__":
    main()
