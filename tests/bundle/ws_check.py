"""WebSocket checks through Caddy for tests/bundle/caddy.sh.

Usage: python ws_check.py HOST PORT CAFILE HANDLE PASSWORD

1. Connects to wss://HOST:PORT/xrpc/com.atproto.sync.subscribeRepos?cursor=0
   (TCP to 127.0.0.1, SNI and Host = HOST) and expects a binary firehose frame
   replayed from the log within 10 s.
2. Opens a live subscription (no cursor), creates a record through Caddy, and
   expects that commit's frame within 3 s: proof that frames are not buffered.
Exits 0 when both hold, else prints why and exits 1.
"""

import asyncio
import json
import ssl
import sys
import time
import urllib.request

import websockets

HOST, PORT, CAFILE, HANDLE, PASSWORD = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
CTX = ssl.create_default_context(cafile=CAFILE)
SUB = "com.atproto.sync.subscribeRepos"


def connect(query=""):
    return websockets.connect(
        f"wss://{HOST}:{PORT}/xrpc/{SUB}{query}",
        host="127.0.0.1",
        port=PORT,
        server_hostname=HOST,
        ssl=CTX,
        open_timeout=10,
        max_size=None,
    )


class Resolve(urllib.request.HTTPSHandler):
    """HTTPS to 127.0.0.1 with SNI and Host of HOST (like curl --resolve)."""

    def __init__(self):
        super().__init__(context=CTX)

    def https_open(self, req):
        import http.client

        class Conn(http.client.HTTPSConnection):
            def connect(self):
                import socket

                sock = socket.create_connection(("127.0.0.1", PORT), timeout=10)
                self.sock = CTX.wrap_socket(sock, server_hostname=HOST)

        return self.do_open(Conn, req, context=CTX)


OPENER = urllib.request.build_opener(Resolve())


def xrpc(method, body, token=None):
    req = urllib.request.Request(
        f"https://{HOST}:{PORT}/xrpc/{method}",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", **({"authorization": f"Bearer {token}"} if token else {})},
        method="POST",
    )
    with OPENER.open(req, timeout=10) as resp:
        return json.load(resp)


def is_frame(msg, kinds):
    return isinstance(msg, bytes) and any(k.encode() in msg[:64] for k in kinds)


async def main():
    # 1. Replay from the start of the log.
    async with connect("?cursor=0") as ws:
        msg = await asyncio.wait_for(ws.recv(), 10)
        if not is_frame(msg, ("#commit", "#identity", "#account", "#sync")):
            print(f"replay: first message is not a firehose frame: {msg[:80]!r}")
            return 1
        print(f"replay: got a {len(msg)}-byte frame through Caddy")

    # 2. Live: a new commit must arrive promptly (no proxy buffering).
    session = xrpc("com.atproto.server.createSession", {"identifier": HANDLE, "password": PASSWORD})
    async with connect() as ws:
        await asyncio.sleep(0.5)
        started = time.monotonic()
        created = xrpc(
            "com.atproto.repo.createRecord",
            {
                "repo": session["did"],
                "collection": "app.bsky.feed.post",
                "record": {
                    "$type": "app.bsky.feed.post",
                    "text": "bundle test",
                    "createdAt": "2026-01-01T00:00:00.000Z",
                },
            },
            session["accessJwt"],
        )
        rkey = created["uri"].rsplit("/", 1)[1]
        while True:
            left = 3 - (time.monotonic() - started)
            if left <= 0:
                print("live: the new commit's frame did not arrive within 3 s")
                return 1
            try:
                msg = await asyncio.wait_for(ws.recv(), left)
            except asyncio.TimeoutError:
                continue
            if is_frame(msg, ("#commit",)) and rkey.encode() in msg:
                print(f"live: commit frame for {rkey} after {time.monotonic() - started:.2f} s")
                return 0


sys.exit(asyncio.run(main()))
