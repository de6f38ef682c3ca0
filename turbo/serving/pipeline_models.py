"""The python-backend models clients call, image bytes in:

- ImageModel: images preprocessed with the export's image processor, the encoder model called with
  BLS; labels, classes and scores out for classifiers, the encoder's outputs otherwise;
- CaptionModel: captions out: BLIP's decode loop over the encoder and decoder models, each step a
  BLS request.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils
from transformers import AutoImageProcessor, AutoTokenizer

from turbo.core.manifest import DecoderRecord
from turbo.data.images import batches, pixel_batch
from turbo.runtimes.caption import CaptionPipeline, GraphDecoder, settings_from_config
from turbo.serving.backend_utils import BlsRunner, RequestError, answer_each, decode_images, model_parameters, tensor


class ImageModel:
    """Encoded images -> the encoder model (BLS) -> top-k labels and scores, or the encoder's outputs."""

    def initialize(self, args: dict) -> None:
        config, parameters, version = model_parameters(args)
        self.processor = AutoImageProcessor.from_pretrained(version)
        self.channels = int(parameters["channels"])
        self.static_batch = int(parameters.get("static_batch", "0"))
        encoder_outputs = json.loads(parameters["encoder_outputs"])
        self.encoder = BlsRunner(parameters["encoder"], [parameters["encoder_input"]], encoder_outputs)
        labels_file = parameters.get("labels_file")
        self.labels = json.loads((version / labels_file).read_text()) if labels_file else None
        self.top_k = int(parameters.get("top_k", "5"))

    def execute(self, requests) -> list:
        return answer_each(requests, self._answer)

    def _answer(self, request) -> list:
        pixels = pixel_batch(decode_images(request, self.channels), self.processor, self.channels)  # (B, C, H, W)
        outputs = self._encode(pixels)
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
        if not self.static_batch:
            return self.encoder.run({self.encoder.input_names[0]: pixels})
        parts = [{k: v[:count] for k, v in self.encoder.run({self.encoder.input_names[0]: chunk}).items()}
                 for chunk, count in batches(pixels, self.static_batch, static=True)]
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

    def execute(self, requests) -> list:
        return answer_each(requests, self._answer)

    def _answer(self, request) -> list:
        pixels = pixel_batch(decode_images(request, self.channels), self.pipeline.processor, self.channels)
        prompt_tensor = pb_utils.get_input_tensor_by_name(request, "prompt")
        prompt = self.default_prompt
        if prompt_tensor is not None:
            prompt = bytes(prompt_tensor.as_numpy().reshape(-1)[0]).decode()
        needed = len(self.pipeline.prompt_ids(prompt)) + self.pipeline.settings.max_new_tokens
        if self.max_positions is not None and needed > self.max_positions:
            raise RequestError(f"the prompt needs {needed} decoder positions with the caption, the decoder has "
                               f"{self.max_positions}: send a shorter prompt")
        results = self.pipeline.caption(pixels, prompt, batch=len(pixels))
        captions = np.array([[result["caption"].encode()] for result in results], dtype=np.object_)  # (B, 1)
        return [tensor("caption", captions)]

    def finalize(self) -> None:
        self.pipeline = None
