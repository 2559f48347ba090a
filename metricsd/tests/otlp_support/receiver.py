"""An OTLP/HTTP receiver for the tests, built on the official `opentelemetry-proto`
package: it decodes every request body with the OpenTelemetry project's own generated
messages and writes what it found, one JSON object per request, to --out.

With --forward URL it also sends each body unchanged to a collector (rotel) at URL and
answers with the collector's status and body, so the collector accepts (or refuses)
every request metricsd sent. With --fail N it answers the first N requests
`503 Service Unavailable` with `Retry-After: --retry-after` (without decoding them),
then behaves normally.

Prints `listening <port>` once the socket is bound.
"""

import argparse
import json
import sys
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2


def attrs(kvs):
    out = {}
    for kv in kvs:
        which = kv.value.WhichOneof("value")
        out[kv.key] = str(getattr(kv.value, which)) if which else None
    return out


def decode_metrics(body):
    req = metrics_service_pb2.ExportMetricsServiceRequest()
    req.ParseFromString(body)
    points = []
    for rm in req.resource_metrics:
        res = attrs(rm.resource.attributes)
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                kind = m.WhichOneof("data")
                base = {"resource": res, "scope": sm.scope.name, "name": m.name, "kind": kind}
                if kind in ("sum", "gauge"):
                    data = getattr(m, kind)
                    for p in data.data_points:
                        which = p.WhichOneof("value")
                        d = dict(base, attributes=attrs(p.attributes),
                                 value=str(getattr(p, which)),
                                 start=p.start_time_unix_nano, time=p.time_unix_nano)
                        if kind == "sum":
                            d["monotonic"] = data.is_monotonic
                            d["temporality"] = data.aggregation_temporality
                        points.append(d)
                elif kind == "histogram":
                    for p in m.histogram.data_points:
                        points.append(dict(base, attributes=attrs(p.attributes),
                                           count=p.count, sum=p.sum,
                                           bucket_counts=list(p.bucket_counts),
                                           bounds=list(p.explicit_bounds),
                                           temporality=m.histogram.aggregation_temporality,
                                           start=p.start_time_unix_nano,
                                           time=p.time_unix_nano))
                elif kind == "exponential_histogram":
                    for p in m.exponential_histogram.data_points:
                        points.append(dict(base, attributes=attrs(p.attributes),
                                           count=p.count, sum=p.sum,
                                           scale=p.scale, zero_count=p.zero_count,
                                           offset=p.positive.offset,
                                           bucket_counts=list(p.positive.bucket_counts),
                                           negative_counts=list(p.negative.bucket_counts),
                                           min=p.min if p.HasField("min") else None,
                                           max=p.max if p.HasField("max") else None,
                                           temporality=m.exponential_histogram.aggregation_temporality,
                                           start=p.start_time_unix_nano,
                                           time=p.time_unix_nano))
                else:
                    points.append(dict(base))
    return points


def decode_traces(body):
    req = trace_service_pb2.ExportTraceServiceRequest()
    req.ParseFromString(body)
    spans = []
    for rs in req.resource_spans:
        res = attrs(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                spans.append({
                    "resource": res,
                    "scope": ss.scope.name,
                    "name": s.name,
                    "trace_id": s.trace_id.hex(),
                    "span_id": s.span_id.hex(),
                    "parent_span_id": s.parent_span_id.hex(),
                    "flags": s.flags,
                    "start": s.start_time_unix_nano,
                    "end": s.end_time_unix_nano,
                    "status": s.status.code,
                    "status_message": s.status.message,
                    "attributes": attrs(s.attributes),
                })
    return spans


class State:
    def __init__(self, args):
        self.args = args
        self.lock = threading.Lock()
        self.failed = 0
        self.out = open(args.out, "a", encoding="utf-8")

    def write(self, obj):
        with self.lock:
            self.out.write(json.dumps(obj) + "\n")
            self.out.flush()


def handler(state):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *a):
            pass

        def reply(self, code, body=b"", headers=()):
            self.send_response(code)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(body)))
            for k, v in headers:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            with state.lock:
                fail = state.failed < state.args.fail
                if fail:
                    state.failed += 1
            if fail:
                state.write({"path": self.path, "answered": 503})
                self.reply(503, headers=[("Retry-After", str(state.args.retry_after))])
                return
            record = {"path": self.path, "bytes": len(body),
                      "content_type": self.headers.get("Content-Type")}
            try:
                if self.path == "/v1/metrics":
                    record["points"] = decode_metrics(body)
                elif self.path == "/v1/traces":
                    record["spans"] = decode_traces(body)
                else:
                    record["error"] = "unknown path"
            except Exception as e:  # a body the official messages cannot decode
                record["error"] = "decode: %s" % e
            code, answer = 200, b""
            if state.args.forward:
                req = urllib.request.Request(state.args.forward.rstrip("/") + self.path,
                                             data=body, method="POST",
                                             headers={"Content-Type": "application/x-protobuf"})
                try:
                    with urllib.request.urlopen(req, timeout=30) as r:
                        code, answer = r.status, r.read()
                except urllib.error.HTTPError as e:
                    code, answer = e.code, e.read()
                except Exception as e:
                    code, answer = 502, b""
                    record["forward_error"] = str(e)
                record["collector_status"] = code
            if "error" in record:
                code = 400
            record["answered"] = code
            state.write(record)
            self.reply(code, answer)

    return Handler


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--forward")
    p.add_argument("--fail", type=int, default=0)
    p.add_argument("--retry-after", type=int, default=1)
    args = p.parse_args()
    state = State(args)
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler(state))
    print("listening %d" % server.server_address[1], flush=True)
    # Ends when the parent test closes our stdin (or dies).
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sys.stdin.read()
    server.shutdown()


if __name__ == "__main__":
    main()
