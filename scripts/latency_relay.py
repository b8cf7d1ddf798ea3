#!/usr/bin/env python3
"""A user-space TCP relay that adds a fixed one-way delay, for WAN emulation on 127.0.0.1.

The kernel here has no netem, so scripts/bench_cluster.py puts one of these in front of every
ordered pair of nodes: node i is told to --peer the relay's port instead of node j's, and the
relay forwards to node j. Each direction of each connection is delayed by --delay-ms: bytes read
at time t are written at t + delay, in order, with no bandwidth limit.

    latency_relay.py --delay-ms 100 --link ID:LISTEN_PORT:TARGET_PORT [--link ...]

LISTEN_PORT 0 lets the kernel choose the port; TARGET_PORT 0 means the target is not known yet
(set it with `target`). Prints one line "ready {ID: listening port, ...}" (JSON after the word)
on stdout once every link listens. Commands, one per line on stdin:

    target ID PORT      forward the link to PORT from now on (answers "ok")
    block ID [ID ...]   drop the links' connections and refuse new ones (a partition)
    unblock             accept on every link again
    stats               print {"links": {ID: {"bytes_forward", "bytes_back", "connections",
                        "accepted", "refused"}}} as one JSON line

A connection accepted while its target is not known or not listening yet is held, and the target
is retried for up to --connect-timeout seconds, so nodes may start in any order. End of input (or SIGTERM)
stops the relay. Python 3.11 standard library only.
"""

import argparse
import asyncio
import json
import signal
import sys


class Link:
    def __init__(self, ident, listen_port, target_port):
        self.ident = ident
        self.listen_port = listen_port
        self.target_port = target_port
        self.blocked = False
        self.writers = set()
        self.bytes_forward = 0
        self.bytes_back = 0
        self.accepted = 0
        self.refused = 0

    def stats(self):
        return {
            "bytes_forward": self.bytes_forward,
            "bytes_back": self.bytes_back,
            "connections": len(self.writers) // 2,
            "accepted": self.accepted,
            "refused": self.refused,
        }

    def drop_all(self):
        for writer in list(self.writers):
            transport = writer.transport
            if transport is not None:
                transport.abort()
        self.writers.clear()


async def pump(reader, writer, delay, link, forward):
    """Copies reader to writer, each chunk written `delay` seconds after it was read. Returns
    "eof" after a clean end of stream, "error" when either socket failed."""
    loop = asyncio.get_running_loop()
    pending = asyncio.Queue()

    async def deliver():
        try:
            while True:
                due, data = await pending.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if data is None:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return "eof"
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            return "error"

    delivery = asyncio.create_task(deliver())
    try:
        while True:
            data = await reader.read(256 * 1024)
            if forward:
                link.bytes_forward += len(data)
            else:
                link.bytes_back += len(data)
            pending.put_nowait((loop.time() + delay, data if data else None))
            if not data:
                break
    except (ConnectionError, OSError):
        delivery.cancel()
        return "error"
    return await delivery


async def serve_link(link, delay, connect_timeout):
    loop = asyncio.get_running_loop()

    async def on_client(client_reader, client_writer):
        if link.blocked:
            link.refused += 1
            client_writer.transport.abort()
            return
        link.accepted += 1
        deadline = loop.time() + connect_timeout
        target = None
        while target is None:
            try:
                if not link.target_port:
                    raise ConnectionRefusedError("the link's target is not known yet")
                target = await asyncio.open_connection("127.0.0.1", link.target_port)
            except OSError:
                if loop.time() > deadline or link.blocked:
                    client_writer.transport.abort()
                    return
                await asyncio.sleep(0.1)
        target_reader, target_writer = target
        if link.blocked:
            client_writer.transport.abort()
            target_writer.transport.abort()
            return
        link.writers.update((client_writer, target_writer))
        pending = {
            asyncio.create_task(pump(client_reader, target_writer, delay, link, True)),
            asyncio.create_task(pump(target_reader, client_writer, delay, link, False)),
        }
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if any(task.cancelled() or task.exception() or task.result() == "error" for task in done):
                    break
        except asyncio.CancelledError:
            pass  # the relay is stopping
        finally:
            for task in pending:
                task.cancel()
            link.writers.discard(client_writer)
            link.writers.discard(target_writer)
            client_writer.transport.abort()
            target_writer.transport.abort()

    return await asyncio.start_server(on_client, "127.0.0.1", link.listen_port, reuse_address=True)


async def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay per direction")
    parser.add_argument("--link", action="append", default=[], help="ID:LISTEN_PORT:TARGET_PORT")
    parser.add_argument("--connect-timeout", type=float, default=30.0)
    arguments = parser.parse_args()
    delay = arguments.delay_ms / 1000.0
    links = {}
    for text in arguments.link:
        ident, listen_port, target_port = text.split(":")
        links[ident] = Link(ident, int(listen_port), int(target_port))
    servers = [await serve_link(link, delay, arguments.connect_timeout) for link in links.values()]
    ports = {ident: server.sockets[0].getsockname()[1] for ident, server in zip(links, servers)}
    print("ready " + json.dumps(ports), flush=True)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    commands = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(commands), sys.stdin)

    async def read_commands():
        while True:
            line = await commands.readline()
            if not line:
                stop.set()
                return
            words = line.decode().split()
            if not words:
                continue
            if words[0] == "target":
                if len(words) == 3 and words[1] in links and words[2].isdigit():
                    links[words[1]].target_port = int(words[2])
                    print("ok", flush=True)
                else:
                    print(json.dumps({"error": "usage: target ID PORT, with the ID of a link"}), flush=True)
            elif words[0] == "block":
                for ident in words[1:]:
                    if ident in links:
                        links[ident].blocked = True
                        links[ident].drop_all()
                print("ok", flush=True)
            elif words[0] == "unblock":
                for link in links.values():
                    link.blocked = False
                print("ok", flush=True)
            elif words[0] == "stats":
                print(json.dumps({"links": {ident: link.stats() for ident, link in links.items()}}), flush=True)
            else:
                print(json.dumps({"error": f"unknown command {words[0]}"}), flush=True)

    reader_task = asyncio.create_task(read_commands())
    await stop.wait()
    reader_task.cancel()
    for server in servers:
        server.close()
    for link in links.values():
        link.drop_all()


if __name__ == "__main__":
    asyncio.run(main())
