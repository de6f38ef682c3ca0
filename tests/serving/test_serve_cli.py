"""`turbo serve` as a user runs it: a real server until Ctrl-C; `turbo bench --url` against a server
that dies mid-run; and one line, with the exit code, for what cannot run."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from typer.testing import CliRunner

from turbo.cli.app import app
from turbo.serving.repository import DeployOptions
from turbo.serving.server import free_port
from turbo.tools.deploy import deploy_triton

runner = CliRunner()


def _successes(http_port: int, model: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/models/{model}/stats", timeout=2) as response:
            stats = json.loads(response.read())
    except OSError:
        return 0
    return int(stats["model_stats"][0]["inference_stats"]["success"]["count"])


def test_serve_runs_until_ctrl_c_and_a_bench_of_a_dying_server_says_so(served_exports, server_binary, tmp_path):
    repo = tmp_path / "repo"
    deploy_triton([served_exports["vit"]], repo, DeployOptions(backend="python"))
    shutil.rmtree(repo / "vit")  # the encoder alone loads in a second (the image model imports transformers)
    http, grpc, metrics = free_port(), free_port(), free_port()
    serve = subprocess.Popen([sys.executable, "-m", "turbo", "serve", str(repo), "--http-port", str(http),
                              "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
                             stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in serve.stderr:
            lines.append(line)
            if line.startswith(("ready:", "error:")):
                break
        assert lines[-1].startswith("ready:") and f"http://127.0.0.1:{http}" in lines[-1], lines
        bench = subprocess.Popen([sys.executable, "-m", "turbo", "bench", "--url", f"http://127.0.0.1:{http}",
                                  "--model", "vit-encoder", "--concurrency", "2", "--duration", "5"],
                                 stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while _successes(http, "vit-encoder") < 5 and time.monotonic() < deadline and bench.poll() is None:
            time.sleep(0.2)
        serve.send_signal(signal.SIGINT)  # Ctrl-C
        assert serve.wait(30) == 0
        assert "stopping tritonserver" in serve.stderr.read()
        with socket.socket() as probe:  # the server is gone: its port is free again
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past the bench's TIME_WAIT connections
            probe.bind(("127.0.0.1", http))
        _, bench_errors = bench.communicate(timeout=60)
        assert bench.returncode == 1, bench_errors
        assert f"the server at http://127.0.0.1:{http} stopped answering during the bench" in bench_errors
        assert "Traceback" not in bench_errors
    finally:
        for process in (serve,):
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)


def test_serve_without_a_server_binary_exits_4(repository, monkeypatch):
    monkeypatch.setattr("turbo.serving.server.shutil.which", lambda name: None)
    monkeypatch.setattr("turbo.serving.server.importlib.util.find_spec", lambda name: None)
    result = runner.invoke(app, ["serve", str(repository)])
    assert result.exit_code == 4
    assert "no tritonserver found" in result.output and "nvidia-pytriton" in result.output
    assert len(result.output.splitlines()) == 1


@pytest.mark.parametrize("flag", ["--http-port", "--grpc-port"])
def test_a_port_in_use_is_one_line(repository, server_binary, flag):
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = {"--http-port": str(free_port()), "--grpc-port": str(free_port()), "--metrics-port": str(free_port())}
        ports[flag] = str(port)
        result = runner.invoke(app, ["serve", str(repository), *[x for pair in ports.items() for x in pair]])
    assert result.exit_code == 2 and f"port {port} is in use; choose another with {flag}" in result.output


def test_serve_refuses_what_is_not_a_repository(tmp_path):
    (tmp_path / "model").mkdir()
    result = runner.invoke(app, ["serve", str(tmp_path)])
    assert result.exit_code == 2 and "has no config.pbtxt" in result.output
    result = runner.invoke(app, ["serve", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "is not a directory" in result.output


def test_a_model_that_fails_to_load_is_one_line(served_exports, server_binary, tmp_path):
    repo = tmp_path / "repo"
    deploy_triton([served_exports["vit"]], repo, DeployOptions(backend="python"))
    shutil.rmtree(repo / "vit-encoder")
    (repo / "vit" / "1" / "model.py").write_text("raise RuntimeError('this model is broken')\n")
    result = runner.invoke(app, ["serve", str(repo), "--http-port", str(free_port()), "--grpc-port", str(free_port()),
                                 "--metrics-port", str(free_port())])
    assert result.exit_code == 1
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: tritonserver exited") and "RuntimeError: this model is broken" in error
    assert "\\n" not in error and "Traceback" not in result.output
