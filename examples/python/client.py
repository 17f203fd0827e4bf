#!/usr/bin/env python3
"""routopia-realtime example client: connect, subscribe, optionally publish, print updates."""
import argparse
import asyncio
import json
import os
import sys

import websockets
import zstandard

# realtime_pb2 is generated from ../../proto/realtime.proto by ./generate.sh.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "gen"))
import realtime_pb2 as pb  # noqa: E402


class Fail(Exception):
    """An error reply, a disconnect or an offset gap: the client exits with status 1."""


def encode(*frames):
    """One WebSocket binary message = one ClientMessage holding a batch of frames."""
    return pb.ClientMessage(frames=frames).SerializeToString()


def decode(data):
    """One WebSocket binary message = one ServerMessage; `zstd`, if set, is a compressed one."""
    msg = pb.ServerMessage.FromString(data)
    frames = msg.frames
    if msg.zstd:
        frames = pb.ServerMessage.FromString(zstandard.ZstdDecompressor().decompressobj().decompress(msg.zstd)).frames
    # A batch encoded once for every subscriber names the subscription in the envelope.
    for frame in frames:
        if frame.HasField("update") and frame.update.sub_id == 0:
            frame.update.sub_id = msg.sub_id
    return frames


def publishes(channel, n):
    """N ROUTE updates, with frame id 0: no reply wanted (an error would still be sent)."""
    return [pb.ClientFrame(id=0, publish=pb.Publish(channel=channel, type=pb.ROUTE, key=f"leg-{i}", confidence=0.9,
                                                    payload=json.dumps({"eta_s": 600 - i}).encode()))
            for i in range(1, n + 1)]


async def run(args):
    async with websockets.connect(args.url, max_size=16 << 20, compression=None) as ws:
        # Connect must be the first frame; frames run in order, so Subscribe can share its message.
        await ws.send(encode(pb.ClientFrame(id=1, connect=pb.Connect(token=args.token, name="python-example", accept_zstd=True)),
                             pb.ClientFrame(id=2, subscribe=pb.Subscribe(channel=args.channel))))
        received, expected = 0, None
        async for data in ws:
            for frame in decode(data):  # the server batches many frames per message
                kind = frame.WhichOneof("kind")
                if kind == "reply":
                    reply = frame.reply
                    if reply.HasField("error"):
                        raise Fail(f"request {reply.id} failed: {reply.error.code} {reply.error.message}")
                    if reply.HasField("connect"):
                        print(f"connected as {reply.connect.client_id} (server {reply.connect.server_version})")
                    elif reply.HasField("subscribe"):
                        sub = reply.subscribe
                        print(f"subscribed {args.channel}: sub_id={sub.sub_id} epoch={sub.epoch} offset={sub.offset}")
                        expected = sub.offset + 1  # offsets are contiguous: a gap means lost updates
                        if args.publish:
                            await ws.send(encode(*publishes(args.channel, args.publish)))
                elif kind == "update":
                    u = frame.update
                    print(f"update sub_id={u.sub_id} offset={u.offset} type={pb.UpdateType.Name(u.type)} "
                          f"key={u.key} payload={u.payload.decode(errors='replace')}")
                    if u.offset != expected:
                        raise Fail(f"expected offset {expected}, got {u.offset}")
                    received, expected = received + 1, expected + 1
                    if received == args.count:
                        return
                elif kind == "disconnect":  # the server closes the connection next
                    d = frame.disconnect
                    raise Fail(f"disconnected: {d.code} {d.reason} (reconnect={d.reconnect})")
    raise Fail(f"connection closed after {received} updates")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="ws://127.0.0.1:3000/ws")
    p.add_argument("--token", default=os.environ.get("ROUTOPIA_TOKEN", ""), help="JWT for Connect (or $ROUTOPIA_TOKEN)")
    p.add_argument("--channel", default="route:42")
    p.add_argument("--publish", type=int, default=0, metavar="N", help="also publish N ROUTE updates")
    p.add_argument("--count", type=int, default=0, help="stop after this many updates (0 = never)")
    p.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    args = p.parse_args()
    try:
        asyncio.run(asyncio.wait_for(run(args), args.timeout))
    except TimeoutError:  # before OSError, its base class
        sys.exit(f"FAIL: timed out after {args.timeout}s")
    except (Fail, OSError, websockets.exceptions.WebSocketException) as err:
        sys.exit(f"FAIL: {err}")
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
