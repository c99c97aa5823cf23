"""The local S3+DynamoDB emulator gives conditional writes the atomicity AWS documents.

moto alone evaluates a ConditionExpression as a read, then a write, on per-request threads: two
racing writers could both win (seen as a doubled segment in the two-writer fence test).
ops/moto_serial.py serialises requests; these tests pin that down."""
import importlib.util
import os
import threading
import time

from conftest import REPO, stack_service_argv

spec = importlib.util.spec_from_file_location("moto_serial", os.path.join(REPO, "ops", "moto_serial.py"))
moto_serial = importlib.util.module_from_spec(spec)
spec.loader.exec_module(moto_serial)


def racy_conditional_put(store):
    """A WSGI app that, like moto, checks a condition and writes later with no lock between."""
    def app(environ, start_response):
        key = environ["PATH_INFO"]
        if key in store:
            start_response("400 Bad Request", [])
            return [b"ConditionalCheckFailed"]
        time.sleep(0.05)  # the window two threads of moto can both pass through
        store[key] = environ["wsgi.input"].read()
        start_response("200 OK", [])
        return [b"ok"]
    return app


def race(app, contenders=6):
    from io import BytesIO
    statuses = []
    barrier = threading.Barrier(contenders)

    def attempt(i):
        body = f"writer {i}".encode()
        environ = {"PATH_INFO": "/item", "CONTENT_LENGTH": str(len(body)), "wsgi.input": BytesIO(body)}
        barrier.wait()
        list(app(environ, lambda status, headers: statuses.append(status)))

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(contenders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [s for s in statuses if s.startswith("200")]


def test_the_unserialised_app_really_races():
    # The control: without the middleware the racy app lets several writers win.
    assert len(race(racy_conditional_put({}))) > 1


def test_serialised_requests_let_exactly_one_conditional_writer_win():
    store = {}
    winners = race(moto_serial.OneAtATime(racy_conditional_put(store)))
    assert len(winners) == 1, winners
    assert store["/item"].startswith(b"writer ")


def test_the_local_stack_runs_moto_serialised():
    """The moto this stack started (its pid file), not just any process of that name."""
    cmdline = " ".join(stack_service_argv("moto"))
    assert "ops/moto_serial.py" in cmdline, f"the stack's S3+DynamoDB server is not serialised: {cmdline}"
