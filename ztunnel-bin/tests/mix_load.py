#!/usr/bin/env python3
"""Mixed load through a local mesh, for `tests/local.rs`: long-lived echo streams that carry
checked bytes both ways, beside short HTTP calls at a fixed rate. Prints one JSON summary.

    mix_load.py echo PORT
        an echo server on 0.0.0.0:PORT; prints "ready" once it listens
    mix_load.py load --echo HOST:PORT --http URL_HOST:PORT --streams N --stream-rate BYTES_PER_S
                     --rate CALLS_PER_S --seconds S
        N echo streams (each sends a deterministic byte pattern and checks every byte echoed),
        and HTTP GETs at the rate; a call slower than 2 s or a stream that makes no progress for
        2 s while bytes are outstanding is a stall
"""

import asyncio
import json
import sys
import time

STALL = 2.0


_PATTERNS = {}


def pattern(stream, offset, n):
    """The `n` bytes at `offset` of stream `stream`'s byte pattern (period 251)."""
    big = _PATTERNS.get(stream)
    if big is None:
        base = bytes(((k * 31) % 251) ^ stream for k in range(251))
        big = _PATTERNS[stream] = base * 300
    start = offset % 251
    if n > len(big) - start:
        return bytes(big[(start + i) % 251] for i in range(n))
    return big[start : start + n]


async def echo(port):
    async def handle(reader, writer):
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
            writer.write_eof()
        except OSError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "0.0.0.0", port)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


async def echo_stream(n, host, port, rate, seconds, stats):
    reader, writer = await asyncio.open_connection(host, port)
    chunk = max(1, rate // 100)
    sent = 0
    received = 0
    last_progress = time.monotonic()
    done_sending = asyncio.Event()

    async def send():
        nonlocal sent
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            writer.write(pattern(n, sent, chunk))
            sent += chunk
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.write_eof()
        done_sending.set()

    async def receive():
        nonlocal received, last_progress
        while True:
            data = await reader.read(65536)
            if not data:
                return
            if data != pattern(n, received, len(data)):
                stats["echo_mismatches"] += 1
                return
            received += len(data)
            last_progress = time.monotonic()

    async def watch():
        while True:
            await asyncio.sleep(0.2)
            if received < sent and time.monotonic() - last_progress > STALL:
                stats["stream_stalls"] += 1
                return
            if done_sending.is_set() and received >= sent:
                return

    sender = asyncio.create_task(send())
    watcher = asyncio.create_task(watch())
    try:
        await asyncio.wait_for(receive(), seconds + 30)
    except (asyncio.TimeoutError, OSError):
        stats["stream_failures"] += 1
    await sender
    watcher.cancel()
    if received != sent:
        stats["stream_short"] += 1
    stats["echo_bytes"] += received
    writer.close()


async def call(host, port, stats):
    started = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
        writer.write(
            f"GET / HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        body = await asyncio.wait_for(reader.read(-1), 10)
        writer.close()
        took = time.monotonic() - started
        stats["calls"] += 1
        if not body.startswith(b"HTTP/1.1 200"):
            stats["call_failures"] += 1
            stats["examples"].append(body[:400].decode(errors="replace"))
        if took > STALL:
            stats["call_stalls"] += 1
            stats["examples"].append(f"{took:.1f}s: {body[:80]!r}")
    except (asyncio.TimeoutError, OSError) as e:
        stats["calls"] += 1
        stats["call_failures"] += 1
        stats["examples"].append(repr(e))


async def load(args):
    opts = dict(zip(args[::2], args[1::2]))
    echo_host, echo_port = opts["--echo"].rsplit(":", 1)
    http_host, http_port = opts["--http"].rsplit(":", 1)
    streams = int(opts["--streams"])
    stream_rate = int(opts["--stream-rate"])
    rate = int(opts["--rate"])
    seconds = float(opts["--seconds"])
    stats = {
        "calls": 0,
        "call_failures": 0,
        "call_stalls": 0,
        "echo_bytes": 0,
        "echo_mismatches": 0,
        "stream_stalls": 0,
        "stream_failures": 0,
        "stream_short": 0,
        "examples": [],
    }
    tasks = [
        asyncio.create_task(echo_stream(n, echo_host, int(echo_port), stream_rate, seconds, stats))
        for n in range(streams)
    ]
    calls = []
    start = time.monotonic()
    i = 0
    while time.monotonic() - start < seconds:
        calls.append(asyncio.create_task(call(http_host, int(http_port), stats)))
        i += 1
        await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
    await asyncio.gather(*calls, *tasks)
    stats["examples"] = stats["examples"][:5]
    print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "echo":
        asyncio.run(echo(int(sys.argv[2])))
    else:
        asyncio.run(load(sys.argv[2:]))
