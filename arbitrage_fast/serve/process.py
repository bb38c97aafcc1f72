"""The server process: the engine loop on the main thread, uvicorn on a thread beside it.

The main thread loaded the models, so it already owns OpenMP's worker pool; running the
engine loop anywhere else makes a second pool and slows every parallel region (worker.py says
why). uvicorn's event loop does no tensor work, so it is the one moved to a thread. Signals
reach only the main thread: SIGINT / SIGTERM ask uvicorn to shut down gracefully (a second
one forces it), and the engine keeps stepping until the streams still open have ended and the
app's shutdown has stopped the loop.
"""
from __future__ import annotations

import signal
import threading

import uvicorn


def run_server(app, host: str, port: int, log_level: str = "info") -> int:
    """Serve `app` (from `create_app`) until shut down; 0 on a clean stop, uvicorn's start-up
    failure code (3) if the HTTP server never started (the port taken, say: uvicorn logged why)."""
    worker = app.state.worker
    worker.on_caller = True  # set before the app's start-up, which would give the loop a thread
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
    exit_code = [0]

    def serve_http() -> None:
        try:
            server.run()
        except SystemExit as e:  # uvicorn exits when it cannot start; here that ends only its thread
            exit_code[0] = e.code if isinstance(e.code, int) else 1

    http = threading.Thread(target=serve_http, name="http", daemon=True)

    def stop(signum, frame) -> None:
        if server.should_exit:
            server.force_exit = True
        server.should_exit = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        http.start()
        worker.run(alive=http.is_alive)
        http.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return exit_code[0] or (0 if server.started else 1)
