"""A stand-in OTLP/HTTP trace collector for check_native.sh.

    otlp_sink.py serve PORTFILE DIR   accept POST /v1/traces (http/protobuf,
                                      gzip or not), store each body as
                                      DIR/NNNN.pb, answer 200 with an empty
                                      ExportTraceServiceResponse; writes the
                                      port it listens on to PORTFILE
    otlp_sink.py spans DIR            decode what was stored (opentelemetry-proto)
                                      and print one JSON object per span:
                                      name, trace_id, span_id, parent_span_id,
                                      service, attributes
"""

import gzip
import http.server
import json
import os
import sys


def serve(port_file, directory):
    os.makedirs(directory, exist_ok=True)
    count = [0]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            if self.path != "/v1/traces":
                self.send_response(404)
                self.end_headers()
                return
            if self.headers.get("content-encoding", "") == "gzip":
                body = gzip.decompress(body)
            count[0] += 1
            path = os.path.join(directory, f"{count[0]:04d}.pb")
            with open(path + ".tmp", "wb") as f:
                f.write(body)
            os.rename(path + ".tmp", path)
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    with open(port_file + ".tmp", "w") as f:
        f.write(str(server.server_address[1]))
    os.rename(port_file + ".tmp", port_file)
    server.serve_forever()


def value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind in ("string_value", "bool_value", "int_value", "double_value") else str(v)


def spans(directory):
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    for name in sorted(os.listdir(directory)):
        if not name.endswith(".pb"):
            continue
        request = ExportTraceServiceRequest()
        with open(os.path.join(directory, name), "rb") as f:
            request.ParseFromString(f.read())
        for rs in request.resource_spans:
            resource = {a.key: value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    print(json.dumps({
                        "name": s.name,
                        "trace_id": s.trace_id.hex(),
                        "span_id": s.span_id.hex(),
                        "parent_span_id": s.parent_span_id.hex(),
                        "service": resource.get("service.name"),
                        "attributes": {a.key: value(a.value) for a in s.attributes},
                    }))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 3 and sys.argv[1] == "spans":
        spans(sys.argv[2])
    else:
        sys.exit(__doc__)
