#!/usr/bin/env python3
"""A loopback TCP proxy that makes a local server look far away: every chunk a client sends waits DELAY ms before
it is forwarded (so each HTTP request pays about that latency), and what the server answers can be limited to
RATE bytes per second per connection. The benches put it in front of the S3 server to measure read-ahead against
a remote store; the tests use it to slow downloads down enough to kill a process in the middle of one.

    python scripts/latency_proxy.py --target 127.0.0.1:8333 --delay-ms 50 [--rate 2MB] [--port 0]

Prints `PORT=N` (and `PID=N`) once it listens; stop it with SIGTERM (or kill by PID).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal


def parse_rate(text: str) -> float:
    units = {"K": 1e3, "M": 1e6, "G": 1e9}
    text = text.upper().removesuffix("B/S").removesuffix("B")
    return float(text[:-1]) * units[text[-1]] if text and text[-1] in units else float(text)


async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, delay: float, rate: float) -> None:
    try:
        while data := await src.read(64 << 10):
            if delay:
                await asyncio.sleep(delay)
            if rate:
                await asyncio.sleep(len(data) / rate)
            dst.write(data)
            await dst.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        try:
            dst.close()
        except RuntimeError:  # the loop is closing
            pass


async def serve(args) -> None:
    host, port = args.target.rsplit(":", 1)

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(host, int(port))
        except OSError:
            client_w.close()
            return
        try:
            await asyncio.gather(
                pump(client_r, server_w, args.delay_ms / 1000, 0), pump(server_r, client_w, 0, args.rate)
            )
        except asyncio.CancelledError:  # stopping: connections still open are simply dropped
            pass

    server = await asyncio.start_server(handle, "127.0.0.1", args.port)
    print(f"PORT={server.sockets[0].getsockname()[1]}\nPID={os.getpid()}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--target", required=True, help="HOST:PORT of the server to forward to")
    p.add_argument("--delay-ms", type=float, default=50.0, help="wait before forwarding each chunk a client sends")
    p.add_argument(
        "--rate", type=parse_rate, default=0.0, help="answer bytes per second per connection, e.g. 2MB (0: unlimited)"
    )
    p.add_argument("--port", type=int, default=0, help="port to listen on (0: any free one)")
    asyncio.run(serve(p.parse_args()))


if __name__ == "__main__":
    main()
