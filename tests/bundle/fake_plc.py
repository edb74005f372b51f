"""A minimal PLC directory for the bundle tests: accepts any operation.

POST /<did> stores the operation and answers 200; GET /<did> answers 200 with a
stub document once the DID is known, else 404. Enough for Roost's first-start
account creation; the real PLC checks live in tests/interop.

Usage: python3 fake_plc.py PORTFILE [HOST]   (binds HOST, default 127.0.0.1,
       on a free port and writes the port to PORTFILE)
"""

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

OPS = {}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length)
        did = self.path.strip("/")
        try:
            OPS[did] = json.loads(body)
        except ValueError:
            self._send(400, {"message": "bad json"})
            return
        self._send(200, {})

    def do_GET(self):
        did = self.path.strip("/")
        if did in OPS:
            self._send(200, {"id": did})
        else:
            self._send(404, {"message": "DID not registered"})


def main():
    host = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1"
    server = ThreadingHTTPServer((host, 0), Handler)
    with open(sys.argv[1], "w") as f:
        f.write(str(server.server_address[1]))
    server.serve_forever()


if __name__ == "__main__":
    main()
