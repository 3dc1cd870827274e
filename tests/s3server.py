"""A real S3 API server for tests and benchmarks: moto's server mode on 127.0.0.1, with a per-request latency.

Run as a script it loads every file below ``--load`` into ``--bucket`` (keys are the relative paths), binds a
free loopback port, prints it on stdout, and serves until its standard input closes (so it never outlives
the process that started it). ``--delay`` seconds are added to every request (an object store's latency),
and ``--processes`` processes serve the same listening socket: the objects are loaded before they fork, so
each holds them all, and moto's own CPU cost per request (a few ms) does not become the test's bottleneck.

:func:`serve` starts it in a subprocess and sets the usual AWS environment variables for the caller.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

#: Path whose GET answers the most requests this server process had in flight at once (then resets it).
PEAK_PATH = "/__flatnorm__/peak"

#: Credentials the server accepts (moto accepts any); tests pass them through the environment only.
ACCESS_KEY, SECRET_KEY = "flatnorm-test-key", "flatnorm-test-secret"


def _load(bucket: str, root: Path) -> int:
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    backend.create_bucket(bucket, "us-east-1")
    n = 0
    for path in sorted(root.rglob("*")):
        if path.is_file():
            backend.put_object(bucket, path.relative_to(root).as_posix(), path.read_bytes())
            n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bucket", default="flatstats")
    parser.add_argument("--load", type=Path, help="directory whose files become the bucket's objects")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds added to every request")
    parser.add_argument("--processes", type=int, default=1)
    args = parser.parse_args()

    from moto.moto_server.werkzeug_app import MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    if args.load is not None:
        _load(args.bucket, args.load)
    app = create_backend_app("s3")

    # Requests in flight in this process, and the most seen at once (GET PEAK_PATH answers it and resets it):
    # tests assert how many requests a reader keeps in flight, which no timing can show reliably.
    lock, state = threading.Lock(), {"now": 0, "peak": 0}

    def delayed(environ, start_response):
        if environ.get("PATH_INFO") == PEAK_PATH:
            with lock:
                peak, state["peak"] = state["peak"], state["now"]
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [str(peak).encode()]
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        try:
            time.sleep(args.delay)
            return app(environ, start_response)
        finally:
            with lock:
                state["now"] -= 1

    class Quiet(MotoRequestHandler):
        def log_request(self, *_args, **_kwargs):
            pass

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    port = listener.getsockname()[1]
    for _ in range(args.processes - 1):
        if os.fork() == 0:
            break
    else:
        print(port, flush=True)
    server = make_server("127.0.0.1", port, delayed, threaded=True, request_handler=Quiet, fd=listener.fileno())
    threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
    server.serve_forever()


def peak_in_flight(endpoint: str) -> int:
    """The most requests one server process had in flight at once since the last call (use ``processes=1``)."""
    import urllib.request

    with urllib.request.urlopen(endpoint + PEAK_PATH, timeout=30) as response:
        return int(response.read())


@contextlib.contextmanager
def serve(load: Path, bucket: str = "flatstats", delay: float = 0.0, processes: int = 1, environ=os.environ):
    """Start the server in a subprocess; yield its endpoint URL with the AWS variables set in ``environ``."""
    process = subprocess.Popen([sys.executable, __file__, "--bucket", bucket, "--load", str(load), "--delay",
                                str(delay), "--processes", str(processes)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    saved = {k: environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL",
                                         "AWS_REGION", "S3_ENDPOINT_URL")}
    try:
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"the S3 test server did not start (exit code {process.wait(30)})")
        endpoint = f"http://127.0.0.1:{int(line)}"
        environ.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_ENDPOINT_URL=endpoint,
                       AWS_REGION="us-east-1")
        environ.pop("S3_ENDPOINT_URL", None)
        yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                environ.pop(key, None)
            else:
                environ[key] = value
        process.stdin.close()  # every server process exits when its standard input closes
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


if __name__ == "__main__":
    main()
