"""`turbo serve`: a real tritonserver over a repository until Ctrl-C (or SIGTERM)."""

import signal
from pathlib import Path

from turbo.cli.output import stderr


def run_serve_command(repository: str, http_port: int, grpc_port: int, metrics_port: int, timeout: float) -> None:
    from turbo.serving.model_config import check_repository
    from turbo.serving.server import TritonServer, find_server

    check_repository(Path(repository))
    binary = find_server()
    server = TritonServer(Path(repository), http_port, grpc_port, metrics_port, binary=binary)
    server.check_ports()
    stderr.print(f"starting tritonserver ({binary.origin}) on {repository}", highlight=False, soft_wrap=True)
    signal.signal(signal.SIGTERM, _interrupt)  # a service manager's stop: the same clean stop as Ctrl-C
    try:
        server.start(timeout)
        stderr.print(f"ready: HTTP {server.http_url}  gRPC {server.grpc_url}  metrics "
                     f"http://127.0.0.1:{metrics_port}/metrics  (log: {server.log_file}); Ctrl-C stops it",
                     highlight=False, soft_wrap=True)
        server.process.wait()
        stderr.print(f"[bold red]error:[/] tritonserver stopped (exit {server.process.returncode}): "
                     f"{server.failure()}", highlight=False, soft_wrap=True)
        raise SystemExit(1)
    except KeyboardInterrupt:
        stderr.print("stopping tritonserver", highlight=False)
    finally:
        server.stop()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
