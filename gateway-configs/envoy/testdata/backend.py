#!/usr/bin/env python3
"""Tiny HTTP/1.1 backend for the Envoy config self-test (loopback only).

  backend.py [--status N] [--host ADDR]

Binds ADDR:0 (default 127.0.0.1) and prints "PORT <n>" on stdout once listening.
Every response body is JSON: {"port": <own port>, "path": ..., "headers": {...}}
with the given status (default 200). A path ending in /sse streams server-sent
events with chunked transfer encoding: three, 0.5 s apart, unless ?n=N&gap=SECONDS says
otherwise.
"""
import argparse
import json
import socket
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--status", type=int, default=200)
    ap.add_argument("--host", default="127.0.0.1")
    args = ap.parse_args()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def _reply(self):
            if "chunked" in (self.headers.get("transfer-encoding") or "").lower():
                body = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        break
                    body += self.rfile.read(size)
                    self.rfile.readline()
            else:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
            if self.path.split("?")[0].endswith("/sse"):
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                q = dict(kv.split("=", 1) for kv in self.path.partition("?")[2].split("&") if "=" in kv)
                n, gap = int(q.get("n", 3)), float(q.get("gap", 0.5))
                for i in range(n):
                    chunk = f"data: {{\"port\": {port}, \"i\": {i}, \"t\": {time.time():.3f}}}\n\n".encode()
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                    time.sleep(gap)
                chunk = b"data: [DONE]\n\n"
                self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(chunk), chunk))
                self.wfile.flush()
                return
            out = json.dumps({
                "port": port,
                "path": self.path,
                "request_body_bytes": len(body),
                "headers": {k.lower(): v for k, v in self.headers.items()},
            }).encode()
            self.send_response(args.status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        do_GET = _reply
        do_POST = _reply

    class Server(ThreadingHTTPServer):
        address_family = socket.AF_INET6 if ":" in args.host else socket.AF_INET

    srv = Server((args.host, 0), Handler)
    port = srv.server_address[1]
    print(f"PORT {port}", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
