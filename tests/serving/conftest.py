"""A Triton repository of tiny exports (a ViT classifier, a BLIP captioner and a LLaVA with DyRate,
python backend) and the real bundled server over it, once per session; tests skip with the reason
when no server can run."""

import shutil
from pathlib import Path

import pytest

from tests.conftest import tiny_export
from turbo.serving.repository import DeployOptions
from turbo.serving.server import ServerMissingError, TritonServer, find_server, free_port
from turbo.tools.deploy import deploy_triton


@pytest.fixture(scope="session")
def served_exports(tmp_path_factory) -> dict[str, Path]:
    """The session's tiny exports, copied under the names their models are served as."""
    root = tmp_path_factory.mktemp("served")
    made = {"vit": tiny_export(tmp_path_factory, "vit-b16", 4),
            "blip": tiny_export(tmp_path_factory, "blip-caption", 4, decoder=True)}
    return {name: Path(shutil.copytree(result.directory, root / name)) for name, result in made.items()}


@pytest.fixture(scope="session")
def served_generation(tmp_path_factory) -> Path:
    """A tiny LLaVA export with DyRate, served as "llava"."""
    made = tiny_export(tmp_path_factory, "llava-1.5-7b", 0, decoder=True,
                       llm_drop="dyrate:layer=2,coverage=0.5,min_keep=0.1")
    return Path(shutil.copytree(made.directory, tmp_path_factory.mktemp("served") / "llava"))


@pytest.fixture(scope="session")
def repository(served_exports, served_generation, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("triton") / "repo"
    deploy_triton([*served_exports.values(), served_generation], out, DeployOptions(backend="python", max_batch=4))
    return out


@pytest.fixture(scope="session")
def server_binary():
    try:
        return find_server()
    except ServerMissingError as exc:
        pytest.skip(f"no Triton server here: {exc}")


@pytest.fixture(scope="session")
def server(repository, server_binary, tmp_path_factory) -> TritonServer:
    running = TritonServer(repository, free_port(), free_port(), free_port(), binary=server_binary,
                           log_file=tmp_path_factory.mktemp("logs") / "tritonserver.log")
    with running:
        yield running
