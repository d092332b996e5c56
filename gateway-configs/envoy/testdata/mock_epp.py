#!/usr/bin/env python3
"""Minimal stand-in EPP for the Envoy config self-test (loopback only; needs grpcio).

  mock_epp.py --pick "ip:port[,ip:port...]" --log FILE [--tls CERT KEY] [--port N]

Serves envoy.service.ext_proc.v3.ExternalProcessor/Process and grpc.health.v1.Health/Check
on 127.0.0.1:N (default 0: the OS chooses) and prints "PORT <n>". Protobuf is encoded by hand (no generated code).
Behaviour follows the EPP wire contract in reference/gie.md section 1.3, reduced to what the
Envoy configuration needs: the request headers answer is deferred to request-body
end-of-stream, then carries x-gateway-destination-endpoint (header and envoy.lb dynamic
metadata, same value) followed by the body as 62,000-byte streamed_response chunks; response headers and
body chunks are answered one by one. When Envoy announces a BUFFERED request body (the FailOpen
templates; protocol_config in the first message), the headers get an empty answer at once and the
body's answer carries the routing instead. Every message received is logged as a JSON line.
"""
import argparse
import json
import sys
import threading
from concurrent import futures

import grpc


# ---- protobuf wire helpers -------------------------------------------------------------
def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def ld(field, payload):
    if isinstance(payload, str):
        payload = payload.encode()
    return varint(field << 3 | 2) + varint(len(payload)) + payload


def vi(field, n):
    return varint(field << 3) + varint(n)


def parse(buf):
    """-> list of (field, wiretype, value) for one message level."""
    i, out = 0, []
    while i < len(buf):
        key, i = read_varint(buf, i)
        field, wt = key >> 3, key & 7
        if wt == 0:
            v, i = read_varint(buf, i)
        elif wt == 2:
            n, i = read_varint(buf, i)
            v, i = buf[i:i + n], i + n
        elif wt == 1:
            v, i = buf[i:i + 8], i + 8
        elif wt == 5:
            v, i = buf[i:i + 4], i + 4
        else:
            raise ValueError("wire type %d" % wt)
        out.append((field, wt, v))
    return out


def read_varint(buf, i):
    shift = n = 0
    while True:
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i


def fields(buf, num):
    return [v for f, _, v in parse(buf) if f == num]


def one(buf, num, default=None):
    vs = fields(buf, num)
    return vs[-1] if vs else default


def decode_struct(buf):
    out = {}
    for entry in fields(buf, 1):
        k = one(entry, 1, b"").decode()
        out[k] = decode_value(one(entry, 2, b""))
    return out


def decode_value(buf):
    for f, _, v in parse(buf):
        if f == 3:
            return v.decode()
        if f == 5:
            return decode_struct(v)
        if f == 6:
            return [decode_value(x) for x in fields(v, 1)]
        if f == 4:
            return bool(v)
    return None


def decode_headers(http_headers):
    hm = one(http_headers, 1, b"")
    out = {}
    for hv in fields(hm, 1):
        key = one(hv, 1, b"").decode()
        val = one(hv, 3) or one(hv, 2) or b""
        out[key] = val.decode(errors="replace")
    return out


def string_value(s):
    return ld(3, s)


def struct(d):
    out = b""
    for k, v in d.items():
        val = ld(5, struct(v)) if isinstance(v, dict) else string_value(v)
        out += ld(1, ld(1, k) + ld(2, val))
    return out


def header_mutation(set_headers):
    return b"".join(ld(1, ld(1, ld(1, k) + ld(3, v))) for k, v in set_headers)


def streamed_body(body, eos):
    return ld(3, ld(1, body) + (vi(2, 1) if eos else b""))


# ProcessingRequest oneof numbers -> names; ProcessingResponse numbers.
REQ = {2: "request_headers", 3: "response_headers", 4: "request_body", 5: "response_body",
       6: "request_trailers", 7: "response_trailers"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pick", required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"))
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    log_lock = threading.Lock()
    logf = open(args.log, "a", buffering=1)

    def log(rec):
        with log_lock:
            logf.write(json.dumps(rec) + "\n")

    def picked_headers_response(body):
        pick = args.pick
        hdrs = [("x-gateway-destination-endpoint", pick)]
        if body:
            hdrs.append(("content-length", str(len(body))))
        common = ld(2, header_mutation(hdrs)) + vi(5, 1)  # clear_route_cache
        md = struct({"envoy.lb": {"x-gateway-destination-endpoint": pick}})
        return ld(1, ld(1, common)) + ld(8, md)

    def process(request_iterator, context):
        body = bytearray()
        buffered = False
        for raw in request_iterator:
            msg = parse(raw)
            protocol = one(raw, 11)
            if protocol is not None:
                buffered = one(protocol, 1, 0) == 2  # request_body_mode BUFFERED
            kind = next((REQ[f] for f, _, _ in msg if f in REQ), None)
            payload = next((v for f, _, v in msg if f in REQ), b"")
            meta = one(raw, 8)
            rec = {"kind": kind}
            if meta:
                rec["metadata"] = {one(e, 1, b"").decode(): decode_struct(one(e, 2, b""))
                                   for e in fields(meta, 1)}
            if kind in ("request_headers", "response_headers"):
                rec["headers"] = decode_headers(payload)
                rec["end_of_stream"] = bool(one(payload, 3, 0))
            elif kind in ("request_body", "response_body"):
                rec["bytes"] = len(one(payload, 1, b""))
                rec["end_of_stream"] = bool(one(payload, 2, 0))
            log(rec)
            if kind == "request_headers":
                if rec["end_of_stream"]:
                    yield picked_headers_response(b"")
                elif buffered:
                    yield ld(1, ld(1, b""))  # no change; routed with the body
            elif kind == "request_body" and buffered:
                # The whole body, kept by Envoy: routing only (header mutation, clear_route_cache,
                # metadata) in a BodyResponse.
                common = ld(2, header_mutation([("x-gateway-destination-endpoint", args.pick)])) + vi(5, 1)
                md = struct({"envoy.lb": {"x-gateway-destination-endpoint": args.pick}})
                yield ld(3, ld(1, common)) + ld(8, md)
            elif kind == "request_body":
                body += one(payload, 1, b"")
                if rec["end_of_stream"]:
                    yield picked_headers_response(bytes(body))
                    # Body back in 62,000-byte streamed_response chunks, EoS on the last.
                    chunks = [bytes(body[i:i + 62000]) for i in range(0, len(body), 62000)] or [b""]
                    for n, c in enumerate(chunks):
                        yield ld(3, ld(1, ld(3, streamed_body(c, n == len(chunks) - 1))))
            elif kind == "response_headers":
                yield ld(2, ld(1, ld(2, header_mutation([("x-went-into-resp-headers", "true")]))))
            elif kind == "response_body":
                chunk = one(payload, 1, b"")
                yield ld(4, ld(1, ld(3, streamed_body(chunk, rec["end_of_stream"]))))
            elif kind == "request_trailers":
                pass  # the reference EPP does not answer request trailers
            elif kind == "response_trailers":
                yield ld(6, b"")

    def health(request, context):
        return vi(1, 1)  # SERVING

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers((
        grpc.method_handlers_generic_handler("envoy.service.ext_proc.v3.ExternalProcessor", {
            "Process": grpc.stream_stream_rpc_method_handler(process)}),
        grpc.method_handlers_generic_handler("grpc.health.v1.Health", {
            "Check": grpc.unary_unary_rpc_method_handler(health)}),
    ))
    if args.tls:
        cert, key = (open(p, "rb").read() for p in args.tls)
        port = server.add_secure_port("127.0.0.1:%d" % args.port, grpc.ssl_server_credentials([(key, cert)]))
    else:
        port = server.add_insecure_port("127.0.0.1:%d" % args.port)
    server.start()
    print(f"PORT {port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    sys.exit(main())
