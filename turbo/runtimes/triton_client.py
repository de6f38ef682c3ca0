"""A model on a running Triton server, over HTTP or gRPC, behind the Runner interface."""

import numpy as np
from google.protobuf.json_format import MessageToDict

from turbo.core.errors import TurboError, UsageError
from turbo.runtimes.base import Runner

TRITON_DTYPES = {"FP32": np.float32, "FP16": np.float16, "INT64": np.int64, "INT32": np.int32, "BYTES": np.object_,
                 "UINT8": np.uint8, "BOOL": np.bool_}
CLIENT_MISSING = "tritonclient is not installed: pip install 'turbo-vlm[serve]'"


class ServerUnavailableError(TurboError):
    """No server answers at the URL, or it stopped answering."""


def split_url(url: str) -> tuple[str, str]:
    """'http://host:port' or 'grpc://host:port' -> (protocol, host:port)."""
    protocol, _, address = url.partition("://")
    if protocol not in ("http", "grpc") or not address or ":" not in address:
        raise UsageError(f"--url {url!r} is not http://HOST:PORT or grpc://HOST:PORT")
    return protocol, address.rstrip("/")


def client_module(protocol: str):
    try:
        if protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
    except ImportError:
        raise TurboError(CLIENT_MISSING) from None
    return module


def server_ready(url: str) -> bool:
    """Whether a server at `url` accepts a new connection and says it is ready (a server shutting down
    still answers on its open connections)."""
    protocol, address = split_url(url)
    client = client_module(protocol).InferenceServerClient(address)
    try:
        return bool(client.is_server_ready())
    except Exception:  # noqa: BLE001 - refused, reset, timed out: not ready
        return False
    finally:
        client.close()


class TritonRunner(Runner):
    """One model of a Triton server; each runner holds its own connection (one per client thread)."""

    name = "triton"

    def __init__(self, url: str, model: str, timeout_s: float = 120.0) -> None:
        self.url, self.model = url, model
        self.protocol, address = split_url(url)
        self.module = client_module(self.protocol)
        from tritonclient.utils import InferenceServerException

        self.server_error = InferenceServerException
        if self.protocol == "grpc":
            self.client = self.module.InferenceServerClient(address)
        else:
            self.client = self.module.InferenceServerClient(address, connection_timeout=timeout_s,
                                                            network_timeout=timeout_s)
        try:
            live = self.client.is_server_live()
        except Exception:  # noqa: BLE001 - connection refused, DNS, TLS: all "nothing answers there"
            live = False
        if not live:
            raise ServerUnavailableError(f"no Triton server answers at {url}; start one with turbo serve REPO")
        try:
            metadata = self.client.get_model_metadata(model)
            config = self.client.get_model_config(model)
        except self.server_error as exc:
            raise UsageError(f"{url} serves no ready model {model!r} ({exc.message()}); its models: "
                             f"{', '.join(self.models())}") from None
        metadata = metadata if isinstance(metadata, dict) else _as_dict(metadata)
        config = config if isinstance(config, dict) else _as_dict(config)
        config = config.get("config", config)
        self.inputs = metadata["inputs"]  # name, datatype, shape (-1 where dynamic)
        self._inputs = [tensor["name"] for tensor in self.inputs]
        self._outputs = [tensor["name"] for tensor in metadata["outputs"]]
        self.max_batch = int(config.get("max_batch_size", 0))
        self.optional = {tensor["name"] for tensor in config.get("input", []) if tensor.get("optional")}
        self.parameters = {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}

    def models(self) -> list[str]:
        index = self.client.get_model_repository_index()
        entries = index if isinstance(index, list) else _as_dict(index).get("models", [])
        return sorted(entry["name"] for entry in entries if entry.get("state", "READY") == "READY")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = []
        for name, value in feeds.items():
            datatype = next(tensor["datatype"] for tensor in self.inputs if tensor["name"] == name)
            value = np.ascontiguousarray(value, dtype=TRITON_DTYPES.get(datatype, value.dtype))
            tensor = self.module.InferInput(name, list(value.shape), datatype)
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
        outputs = [self.module.InferRequestedOutput(name) for name in self._outputs]
        result = self.client.infer(self.model, inputs, outputs=outputs)
        return {name: result.as_numpy(name) for name in self._outputs}

    def describe(self) -> dict:
        return {"runtime": self.name, "url": self.url, "model": self.model, "protocol": self.protocol}

    def close(self) -> None:
        self.client.close()


def _as_dict(message) -> dict:
    """A gRPC response message as the HTTP client's JSON dict."""
    return MessageToDict(message, preserving_proto_field_name=True)
