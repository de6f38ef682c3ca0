"""The python-backend models clients call, image bytes in:

- ImageModel: images preprocessed with the export's image processor, the encoder model called with
  BLS; labels, classes and scores out for classifiers, the encoder's outputs otherwise;
- CaptionModel: captions out: BLIP's decode loop over the encoder and decoder models, each step a
  BLS request;
- GenerateModel: an LLM-based VLM's greedy answer to each (image, prompt) pair: the encoder, prefill
  and decode models, each a BLS request, as `turbo generate` runs the export.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils
from transformers import AutoImageProcessor, AutoTokenizer

from turbo.core.errors import UsageError
from turbo.core.manifest import DecoderRecord, LanguageModelRecord
from turbo.data.images import batches, pixel_batch
from turbo.runtimes.caption import CaptionPipeline, GraphDecoder, settings_from_config
from turbo.runtimes.llm_generation import split_prompt
from turbo.runtimes.llm_onnx import OnnxVlm
from turbo.serving.backend_utils import (
    BlsRunner,
    RequestError,
    answer_each,
    decode_images,
    model_parameters,
    prepare_each,
    tensor,
)

DEFAULT_NEW_TOKENS = 32  # GenerateModel's answer length when a request does not say


class ImageModel:
    """Encoded images -> the encoder model (BLS) -> top-k labels and scores, or the encoder's outputs."""

    def initialize(self, args: dict) -> None:
        config, parameters, version = model_parameters(args)
        self.processor = AutoImageProcessor.from_pretrained(version)
        self.channels = int(parameters["channels"])
        self.static_batch = int(parameters.get("static_batch", "0"))
        self.encoder_max_batch = int(parameters["encoder_max_batch"])
        encoder_outputs = json.loads(parameters["encoder_outputs"])
        self.encoder = BlsRunner(parameters["encoder"], [parameters["encoder_input"]], encoder_outputs)
        labels_file = parameters.get("labels_file")
        self.labels = json.loads((version / labels_file).read_text()) if labels_file else None
        self.top_k = int(parameters.get("top_k", "5"))

    def execute(self, requests) -> list:
        """The images of every request Triton batched together go to the encoder as one batch; a
        request whose bytes are not images gets its own error."""
        pixels = prepare_each(requests, lambda request: pixel_batch(decode_images(request, self.channels),
                                                                    self.processor, self.channels))
        good = [index for index, value in enumerate(pixels) if not isinstance(value, RequestError)]
        encoded = {}
        if good:
            joined = np.concatenate([pixels[index] for index in good])  # (sum B, C, H, W)
            try:
                outputs = self._encode(joined)
                bounds = np.cumsum([0, *(len(pixels[index]) for index in good)])
                encoded = {index: {name: value[a:b] for name, value in outputs.items()}
                           for index, a, b in zip(good, bounds[:-1], bounds[1:])}
            except Exception as exc:  # noqa: BLE001 - each request gets the error, the server keeps serving
                encoded = {index: exc for index in good}
        return answer_each(range(len(requests)), lambda index: self._answer(pixels[index], encoded.get(index)))

    def _answer(self, pixels: np.ndarray | RequestError, outputs: dict | Exception | None) -> list:
        if isinstance(pixels, RequestError):
            raise pixels
        if isinstance(outputs, Exception):
            raise outputs
        if self.labels is None:
            return [tensor(name, value) for name, value in outputs.items()]
        logits = next(iter(outputs.values()))  # (B, classes)
        top = np.argsort(-logits, axis=-1, kind="stable")[:, :self.top_k]
        shifted = np.exp(logits - logits.max(-1, keepdims=True))
        probabilities = shifted / shifted.sum(-1, keepdims=True)
        labels = np.array([[self.labels[i].encode() for i in row] for row in top], dtype=np.object_)
        return [tensor("labels", labels), tensor("classes", top.astype(np.int64)),
                tensor("scores", np.take_along_axis(probabilities, top, -1).astype(np.float32))]

    def _encode(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """In batches the encoder takes: its static batch (the last one padded), else up to its maximum."""
        size = self.static_batch or self.encoder_max_batch
        parts = [{k: v[:count] for k, v in self.encoder.run({self.encoder.input_names[0]: chunk}).items()}
                 for chunk, count in batches(pixels, size, static=bool(self.static_batch))]
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}

    def finalize(self) -> None:
        self.encoder = None


class CaptionModel:
    """Encoded images (and an optional prompt) -> captions, with the export's generation settings."""

    def initialize(self, args: dict) -> None:
        _, parameters, version = model_parameters(args)
        decoder_record = DecoderRecord(**json.loads(parameters["decoder_record"]))
        graphs = json.loads(parameters["graphs"])  # model name, inputs and outputs of each graph
        first = BlsRunner(graphs["first_step"]["model"], graphs["first_step"]["inputs"],
                          graphs["first_step"]["outputs"])
        with_past = BlsRunner(graphs["with_past"]["model"], graphs["with_past"]["inputs"],
                              graphs["with_past"]["outputs"])
        encoder = BlsRunner(graphs["encoder"]["model"], graphs["encoder"]["inputs"], graphs["encoder"]["outputs"])
        generation = json.loads((version / "generation_config.json").read_text())
        self.pipeline = CaptionPipeline(encoder, GraphDecoder(first, with_past, version, decoder_record),
                                        AutoTokenizer.from_pretrained(version), settings_from_config(generation),
                                        generation["bos_token_id"], int(parameters.get("static_batch", "0")) or None,
                                        processor=AutoImageProcessor.from_pretrained(version))
        self.default_prompt = decoder_record.prompt
        self.channels = int(parameters["channels"])
        self.max_positions = decoder_record.max_positions
        self.max_batch = int(parameters["encoder_max_batch"]) or int(parameters.get("static_batch", "1"))

    def execute(self, requests) -> list:
        """Requests Triton batched together are captioned together, one decode loop per prompt; a
        request with bytes that are not images or a prompt that does not fit gets its own error."""
        prepared = prepare_each(requests, self._prepare)
        captions = {}
        by_prompt: dict[str, list[int]] = {}
        for index, value in enumerate(prepared):
            if not isinstance(value, RequestError):
                by_prompt.setdefault(value[1], []).append(index)
        for prompt, indices in by_prompt.items():
            pixels = np.concatenate([prepared[index][0] for index in indices])  # (sum B, C, H, W)
            try:
                results = iter(self.pipeline.caption(pixels, prompt, batch=self.max_batch))
                for index in indices:
                    captions[index] = [next(results)["caption"] for _ in range(len(prepared[index][0]))]
            except Exception as exc:  # noqa: BLE001 - these requests get the error, the server keeps serving
                captions.update({index: exc for index in indices})
        return answer_each(range(len(requests)), lambda index: self._answer(prepared[index], captions.get(index)))

    def _prepare(self, request) -> tuple[np.ndarray, str]:
        """(pixels (B, C, H, W), prompt) of a request; RequestError when it cannot be captioned."""
        pixels = pixel_batch(decode_images(request, self.channels), self.pipeline.processor, self.channels)
        prompt_tensor = pb_utils.get_input_tensor_by_name(request, "prompt")
        prompt = self.default_prompt
        if prompt_tensor is not None:
            prompt = bytes(prompt_tensor.as_numpy().reshape(-1)[0]).decode()
        needed = len(self.pipeline.prompt_ids(prompt)) + self.pipeline.settings.max_new_tokens
        if self.max_positions is not None and needed > self.max_positions:
            raise RequestError(f"the prompt needs {needed} decoder positions with the caption, the decoder has "
                               f"{self.max_positions}: send a shorter prompt")
        return pixels, prompt

    @staticmethod
    def _answer(prepared: tuple | RequestError, captions: list[str] | Exception | None) -> list:
        for failure in (prepared, captions):
            if isinstance(failure, Exception):
                raise failure
        return [tensor("caption", np.array([[caption.encode()] for caption in captions], dtype=np.object_))]

    def finalize(self) -> None:
        self.pipeline = None


class GenerateModel:
    """(image, prompt[, max_new_tokens]) rows -> each row's greedy answer, batch 1 per row."""

    def initialize(self, args: dict) -> None:
        _, parameters, version = model_parameters(args)
        graphs = json.loads(parameters["graphs"])  # model name, inputs and outputs of each graph
        runners = [BlsRunner(graphs[key]["model"], graphs[key]["inputs"], graphs[key]["outputs"])
                   for key in ("encoder", "prefill", "decode")]
        self.vlm = OnnxVlm(*runners, LanguageModelRecord(**json.loads(parameters["llm_record"])),
                           int(parameters.get("static_batch", "0")) or None, AutoTokenizer.from_pretrained(version),
                           AutoImageProcessor.from_pretrained(version))
        self.channels = int(parameters["channels"])

    def execute(self, requests) -> list:
        """Each request's rows in turn; a row that cannot be answered fails only its request."""
        return answer_each(requests, self._answer)

    def _answer(self, request) -> list:
        samples = decode_images(request, self.channels)
        prompts = [bytes(value).decode() for value in
                   pb_utils.get_input_tensor_by_name(request, "prompt").as_numpy().reshape(-1)]
        limit = pb_utils.get_input_tensor_by_name(request, "max_new_tokens")
        limits = limit.as_numpy().reshape(-1).tolist() if limit is not None else [DEFAULT_NEW_TOKENS] * len(prompts)
        if not len(samples) == len(prompts) == len(limits):
            raise RequestError(f"send one prompt (and max_new_tokens, if any) per image: {len(samples)} images, "
                               f"{len(prompts)} prompts, {len(limits)} max_new_tokens")
        texts = [self._generate(sample, prompt, int(tokens))
                 for sample, prompt, tokens in zip(samples, prompts, limits, strict=True)]
        return [tensor("text", np.array([[text.encode()] for text in texts], dtype=np.object_))]

    def _generate(self, sample, prompt: str, max_new_tokens: int) -> str:
        vlm, record = self.vlm, self.vlm.record
        if max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
        try:
            prefix, suffix = split_prompt(vlm.tokenizer, prompt, record.image_token_id, record.image_first)
        except UsageError as exc:
            raise RequestError(str(exc)) from None
        pixels = pixel_batch([sample], vlm.processor, self.channels)
        tokens = list(vlm.greedy_tokens(pixels, prefix, suffix, max_new_tokens))
        return vlm.tokenizer.decode(tokens, skip_special_tokens=True)

    def finalize(self) -> None:
        self.vlm = None
