"""A real `tritonserver` process: found on PATH or in the `nvidia-pytriton` wheel, started on
given ports, ready when Triton says so, stopped by its pid."""

import importlib.util
import os
import shutil
import signal
import site
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy

from turbo.core.cache import cache_root
from turbo.core.errors import EXIT_MISSING_RUNTIME, TurboError, UsageError

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the directory holding the turbo package
HOW_TO_GET = ("install the bundled CPU server with `pip install --no-deps nvidia-pytriton==0.7.0`, put a "
              "tritonserver on PATH, or run in NVIDIA's container (nvcr.io/nvidia/tritonserver:<yy.mm>-py3)")


class ServerMissingError(TurboError):
    exit_code = EXIT_MISSING_RUNTIME


class ServerError(TurboError):
    """The server did not start, or stopped."""


@dataclass(frozen=True)
class ServerBinary:
    path: Path
    backend_directory: Path | None  # None: the server's default (/opt/tritonserver/backends)
    library_path: Path | None = None  # shared libraries the bundled python backend stub needs
    origin: str = "PATH"
    python_bin: Path | None = None  # a directory whose python3 is the interpreter the stub embeds
    python_path: tuple[Path, ...] = ()  # packages put before this environment's in the stub


def find_server() -> ServerBinary:
    """tritonserver from PATH, else the one bundled in nvidia-pytriton, with a python backend set up
    for this interpreter; ServerMissingError (exit 4) naming how to get one."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return ServerBinary(Path(on_path), None)
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        raise ServerMissingError(f"no tritonserver found: {HOW_TO_GET}")
    root = Path(spec.origin).parent / "tritonserver"
    binary = root / "bin" / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not binary.is_file() or not stub.is_file():
        raise ServerMissingError(f"the nvidia-pytriton install at {root.parent} has no server or no python backend "
                                 f"stub for Python {version}: {HOW_TO_GET}")
    libraries = Path(spec.origin).parents[1] / "nvidia_pytriton.libs"
    backends = _backend_directory(root, stub, version)
    overlay = _numpy_overlay(backends.parent)
    return ServerBinary(binary, backends, libraries, f"nvidia-pytriton ({root})",
                        _stub_python(stub, libraries, backends.parent), (overlay,) if overlay else ())


STUB_NUMPY = "1.26.4"  # the bundled stub's pybind11 predates NumPy 2: with 2.x it reads arrays with wrong strides


def _numpy_overlay(cache: Path) -> Path | None:
    """A NumPy 1.x the stub imports before this environment's 2.x (extension modules built against
    NumPy 2, like onnxruntime's and torch's, run on 1.x). Installed once with pip."""
    if int(numpy.__version__.split(".")[0]) < 2:
        return None
    target = cache / f"numpy-{STUB_NUMPY}-py{sys.version_info.major}{sys.version_info.minor}"
    if (target / "numpy").is_dir():
        return target
    staging = Path(tempfile.mkdtemp(dir=cache, prefix=".numpy-"))
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(staging),
               f"numpy=={STUB_NUMPY}"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise ServerMissingError(f"the bundled server's python backend needs NumPy {STUB_NUMPY} beside this "
                                 f"environment's {numpy.__version__}, and pip could not install it "
                                 f"({(done.stderr.strip().splitlines() or ['no output'])[-1]}); run: "
                                 f"{' '.join(command[:-3])} {target} numpy=={STUB_NUMPY}")
    try:
        staging.rename(target)
    except OSError:  # another process installed it first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _stub_python(stub: Path, libraries: Path, cache: Path) -> Path:
    """The stub embeds the libpython it was linked with (often the system's) and takes its standard
    library from the first python3 on PATH: that must be the same interpreter, or extension modules of
    another patch release fail to load. A directory holding only that python3."""
    env = {**os.environ, "LD_LIBRARY_PATH": str(libraries)}
    linked = subprocess.run(["ldd", str(stub)], capture_output=True, text=True, env=env).stdout
    library = next((line.split("=>")[1].split("(")[0].strip() for line in linked.splitlines()
                    if "libpython" in line and "=>" in line), "")
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [Path(sys.executable), Path("/usr/bin") / version, Path("/usr/local/bin") / version]
    for candidate in candidates:
        if library and candidate.is_file() and _links(candidate, Path(library)):
            target = cache / f"python-{candidate.resolve().parent.name}-{version}"
            target.mkdir(parents=True, exist_ok=True)
            link = target / "python3"
            if not link.exists():
                link.symlink_to(candidate)
            return target
    return Path(sys.executable).parent


def _links(python: Path, library: Path) -> bool:
    """Whether `python`'s shared libpython is `library`."""
    query = "import sysconfig as s; print(s.get_config_var('LIBDIR'), s.get_config_var('INSTSONAME'))"
    found = subprocess.run([str(python), "-c", query], capture_output=True, text=True).stdout.split()
    return len(found) == 2 and (Path(found[0]) / found[1]).resolve() == library.resolve()


def _backend_directory(root: Path, stub: Path, version: str) -> Path:
    """The bundled backends with the stub of this Python in the python backend, built once in the
    cache (the wheel's own directory may be read-only)."""
    cache = cache_root() / "triton-backends"
    target = cache / f"{stub.stat().st_size}-{version}"
    if (target / "python" / "triton_python_backend_stub").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache, prefix=".building-"))
    shutil.copytree(root / "backends", staging / "backends")
    shutil.copy2(stub, staging / "backends" / "python" / "triton_python_backend_stub")
    try:
        (staging / "backends").rename(target)
    except OSError:  # another process built it first
        pass
    shutil.rmtree(staging, ignore_errors=True)
    return target


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def check_port_free(port: int, flag: str) -> None:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", port))
        except OSError:
            raise UsageError(f"port {port} is in use; choose another with {flag}") from None


@dataclass
class TritonServer:
    """One tritonserver over one repository; a context manager that starts it and stops it."""

    repository: Path
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    log_file: Path | None = None
    binary: ServerBinary | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def command(self) -> list[str]:
        binary = self.binary or find_server()
        command = [str(binary.path), f"--model-repository={self.repository.resolve()}",
                   f"--http-port={self.http_port}", f"--grpc-port={self.grpc_port}",
                   f"--metrics-port={self.metrics_port}", "--log-verbose=0",
                   "--exit-timeout-secs=10"]
        if binary.backend_directory is not None:
            command.append(f"--backend-directory={binary.backend_directory}")
        return command

    def environment(self) -> dict[str, str]:
        """The python backend's stub takes its packages from the first python3 on PATH: this one."""
        env = dict(os.environ)
        binary = self.binary or find_server()
        python_bin = binary.python_bin or Path(sys.executable).parent
        env["PATH"] = f"{python_bin}{os.pathsep}{env.get('PATH', '')}"
        # this environment's packages and this turbo, also when installed editable (the stub embeds
        # the system's libpython, which ignores PYTHONPATH and runs no .pth hooks): read by each model.py
        paths = [*map(str, binary.python_path), str(PACKAGE_ROOT), *site.getsitepackages(), env.get("PYTHONPATH")]
        env["TURBO_PYTHONPATH"] = os.pathsep.join(filter(None, paths))
        if binary.library_path is not None:
            env["LD_LIBRARY_PATH"] = f"{binary.library_path}{os.pathsep}{env.get('LD_LIBRARY_PATH', '')}"
        return env

    def check_ports(self) -> None:
        for port, flag in ((self.http_port, "--http-port"), (self.grpc_port, "--grpc-port"),
                           (self.metrics_port, "--metrics-port")):
            check_port_free(port, flag)
        if len({self.http_port, self.grpc_port, self.metrics_port}) < 3:
            raise UsageError("--http-port, --grpc-port and --metrics-port must differ")

    def start(self, timeout_s: float = 180.0) -> "TritonServer":
        self.check_ports()
        self.binary = self.binary or find_server()
        if self.log_file is None:
            self.log_file = Path(tempfile.mkstemp(prefix="tritonserver-", suffix=".log")[1])
        with open(self.log_file, "wb") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            env=self.environment(), start_new_session=True)
        self._wait_ready(timeout_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self.process.returncode}: {self.failure()} "
                                  f"(log: {self.log_file})")
            if self.ready():
                return
            time.sleep(0.25)
        self.stop()
        raise ServerError(f"tritonserver was not ready after {timeout_s:.0f} s: {self.failure()} "
                          f"(log: {self.log_file})")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def failure(self) -> str:
        """The log's first error line (a model that failed to load, a port in use)."""
        lines = self.log_file.read_text(errors="replace").splitlines() if self.log_file else []
        for line in lines:
            lowered = line.lower()
            if lowered.startswith("e") and ("failed" in lowered or "error" in lowered) and "cuda" not in lowered \
                    and "nvml" not in lowered and "dcgm" not in lowered:
                message = line.split("] ", 1)[-1].strip().strip('"')
                return message.split("\\n")[0].strip()[:400]  # the log escapes a Python traceback's newlines
        return lines[-1].strip()[:400] if lines else "no output"

    def stop(self, timeout_s: float = 30.0) -> None:
        if not self.alive():
            return
        os.killpg(self.process.pid, signal.SIGTERM)  # the server and its python backend stubs
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> "TritonServer":
        return self.start() if not self.alive() else self

    def __exit__(self, *exc) -> None:
        self.stop()
