#!/usr/bin/env python3
"""moto_server with one request at a time, as ops/stack.sh starts it.

moto serves each request on its own thread and evaluates a conditional write (DynamoDB's
ConditionExpression, S3's If-None-Match) as a read followed by a write with no lock between
them. Two writers racing on one item can then both succeed: measured here, 2 of 200 rounds of 8
concurrent `attribute_not_exists` updates had two winners. DynamoDB and S3 make each such write
atomic, and aegis-audit's fencing (schemas/CHAIN.md) relies on that, so a racy emulator showed
up as a forked flush (a segment written twice) in the two-writer fence test. Serialising the
requests gives the emulator the guarantee the real services document.

A request's body with a Content-Length is read before the lock is taken, so a slow upload does not
hold up others (a chunked body, which neither the Rust SDK nor boto3 sends here, is read inside it).

    moto_serial.py -H 127.0.0.1 -p 15000
"""

import argparse
import io
import signal
import sys
import threading

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import run_simple


class OneAtATime:
    """WSGI middleware: the wrapped application handles one request at a time, to completion."""

    def __init__(self, app):
        self.app = app
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        length = environ.get("CONTENT_LENGTH")
        if length and length.isdigit():
            environ["wsgi.input"] = io.BytesIO(environ["wsgi.input"].read(int(length)))
        with self.lock:
            response = self.app(environ, start_response)
            try:
                return [b"".join(response)]
            finally:
                if hasattr(response, "close"):
                    response.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-H", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, required=True)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    app = DomainDispatcherApplication(create_backend_app)
    run_simple(args.host, args.port, OneAtATime(app), threaded=True, request_handler=MotoRequestHandler)


if __name__ == "__main__":
    main()
