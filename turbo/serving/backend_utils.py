"""What every python-backend model of a turbo repository shares: its parameters, one response per
request (a bad request answers only itself), and other models of the server called with BLS. Runs
only inside tritonserver (`triton_python_backend_utils` is its module)."""

import io
import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from PIL import Image, UnidentifiedImageError

from turbo.data.images import Sample
from turbo.runtimes.base import Runner


class RequestError(Exception):
    """What was wrong with one request; answered as that request's error."""


def model_parameters(args: dict) -> tuple[dict, dict[str, str], Path]:
    config = json.loads(args["model_config"])
    parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
    return config, parameters, Path(args["model_repository"]) / args["model_version"]


def error(message: str, invalid: bool = False):
    """An error response; `invalid`: the request's fault (HTTP 400), else the server's (500)."""
    code = pb_utils.TritonError.INVALID_ARG if invalid else pb_utils.TritonError.INTERNAL
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


def answer_each(requests, answer) -> list:
    """One response per request; a RequestError (or any failure) answers only its own request."""
    responses = []
    for request in requests:
        try:
            responses.append(pb_utils.InferenceResponse(output_tensors=answer(request)))
        except RequestError as exc:
            responses.append(error(str(exc), invalid=True))
        except Exception as exc:  # noqa: BLE001 - the server must keep serving the other requests
            responses.append(error(f"{type(exc).__name__}: {exc}"))
    return responses


def prepare_each(requests, prepare) -> list:
    """`prepare(request)` of each request, or the RequestError that request gets answered with."""
    prepared = []
    for request in requests:
        try:
            prepared.append(prepare(request))
        except RequestError as exc:
            prepared.append(exc)
    return prepared


def tensor(name: str, value: np.ndarray):
    return pb_utils.Tensor(name, np.ascontiguousarray(value))


class BlsRunner(Runner):
    """Another model of the same server behind the Runner interface (a BLS request per run)."""

    name = "triton-bls"

    def __init__(self, model: str, inputs: list[str], outputs: list[str]) -> None:
        self.model, self._inputs, self._outputs = model, inputs, outputs

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        request = pb_utils.InferenceRequest(model_name=self.model, requested_output_names=self._outputs,
                                            inputs=[tensor(name, value) for name, value in feeds.items()])
        response = request.exec()
        if response.has_error():
            raise RequestError(f"{self.model}: {response.error().message()}")
        return {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in self._outputs}


def decode_images(request, channels: int) -> list[Sample]:
    """The request's `image` bytes (B, 1) as PIL images; bytes that are not an image are its error."""
    encoded = pb_utils.get_input_tensor_by_name(request, "image").as_numpy().reshape(-1)
    samples = []
    for index, data in enumerate(encoded):
        try:
            image = Image.open(io.BytesIO(bytes(data)))
            image.load()
        except (OSError, UnidentifiedImageError, ValueError):
            raise RequestError(f"image {index} of the request is not a readable image (send JPEG or PNG bytes)") \
                from None
        samples.append(Sample(None, image=image))
    return samples
