#!/usr/bin/env python3
"""Tiny TCP forwarder used by ops/stack.sh in front of moto_server.

Clients use the public AWS port (this proxy); moto listens on an internal port. Stopping the
proxy (ops/stack.sh stop-aws) makes S3 and DynamoDB unreachable -- connections refused, open
connections reset -- while moto keeps its in-memory state, so start-aws brings the same
buckets, objects and tables back. Standard library only.

    tcp_proxy.py --listen 127.0.0.1:5000 --target 127.0.0.1:15000
"""

import argparse
import asyncio
import signal
import sys


def hostport(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host or "127.0.0.1", int(port)


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        try:
            if writer.can_write_eof():
                writer.write_eof()
        except (OSError, RuntimeError):
            pass


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", required=True, type=hostport)
    ap.add_argument("--target", required=True, type=hostport)
    args = ap.parse_args()
    conns: set[asyncio.StreamWriter] = set()

    async def handle(c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        conns.add(c_writer)
        try:
            t_reader, t_writer = await asyncio.open_connection(*args.target)
        except OSError as e:
            print(f"tcp_proxy: cannot reach target {args.target}: {e}", file=sys.stderr, flush=True)
            c_writer.close()
            conns.discard(c_writer)
            return
        conns.add(t_writer)
        try:
            await asyncio.gather(pipe(c_reader, t_writer), pipe(t_reader, c_writer))
        finally:
            for w in (c_writer, t_writer):
                w.close()
                conns.discard(w)

    server = await asyncio.start_server(handle, *args.listen, reuse_address=True, backlog=256)
    print(f"tcp_proxy: {args.listen[0]}:{args.listen[1]} -> {args.target[0]}:{args.target[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
        # Outage semantics: drop every open connection at once. Inside the block: leaving it
        # waits for open connections to close (Python 3.12.1 and later).
        server.close()
        for w in list(conns):
            w.transport.abort()
    print("tcp_proxy: stopped", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
