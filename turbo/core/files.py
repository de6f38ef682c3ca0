"""The files of an export directory, by name (docs/reference/manifest.md lists what each holds)."""

MANIFEST_FILE = "turbo.json"
MODEL_FILE = "model.onnx"  # the (merged) vision encoder; weights of 1 GiB or more in model.onnx.data
PROCESSOR_FILE = "preprocessor_config.json"  # the image processor, as transformers saves it
ENGINE_FILE = "model.plan"  # the encoder's TensorRT engine (--trt)
BUILD_LOG = "trt_build.log"  # one log for every engine of an export
FIRST_STEP_FILE = "decoder_model.onnx"  # captioning: the decoder's first step over the prompt
WITH_PAST_FILE = "decoder_with_past_model.onnx"  # captioning: one token with the key/value cache
DECODER_WEIGHTS_FILE = "decoder.onnx.data"  # both decoder graphs' weights, each tensor once
GENERATION_FILE = "generation_config.json"  # captioning: token ids and lengths, transformers' format
TOKENIZER_FILE = "tokenizer_config.json"
TEXT_ENCODER_FILE = "text_encoder.onnx"  # retrieval: texts -> embeddings (weights of 1 GiB or more in .data)
MATCH_FILE = "itm.onnx"  # retrieval with a matching head: (text, image tokens) -> match logits
QUESTION_FILE = "question_encoder.onnx"  # VQA: (question, image tokens) -> question states
LLM_PREFILL_FILE = "llm_prefill.onnx"  # LLM-based VLMs: the prompt with its image tokens -> logits, KV cache
LLM_DECODE_FILE = "llm_decode.onnx"  # LLM-based VLMs: one token with the KV cache
LLM_WEIGHTS_FILE = "llm.onnx.data"  # both language-model graphs' weights, each tensor once

# Tensor names of the encoder graph
INPUT_NAME = "pixel_values"
TEXT_INPUTS = ("input_ids", "attention_mask")  # the text encoder's, (B, L) int64 each
TEXT_EMBEDS = "text_embeds"  # the text encoder's output (B, D)
IMAGE_TOKENS = "image_tokens"  # the matching head's image input (B, N, C)
MATCH_LOGITS = "itm_logits"  # the matching head's output (B, 2): index 1, "the text matches the image"
QUESTION_INPUTS = (*TEXT_INPUTS, "image_embeds")  # the question encoder's: (B, L) int64 twice, (B, N, C)
QUESTION_EMBEDS = "question_embeds"  # the question encoder's output (B, L, C), the answer decoder's cross input
QUESTION_MASK = "question_mask"  # (B, L) int64: which question positions the answer decoder attends
# Tensor names of the language-model graphs (LLM-based VLMs)
IMAGE_FEATURES = "image_features"  # LLM-based VLMs: the vision graph's first output, the image tokens the LLM reads
LLM_PREFILL_INPUTS = ("prefix_ids", IMAGE_FEATURES, "suffix_ids")  # (B, P) int64, (B, N, C), (B, S) int64
LLM_DECODE_INPUTS = ("input_ids", "positions")  # (B, 1) int64 each, then past.L.key, past.L.value per layer
CLS_ATTENTION = "cls_attention"  # MustDrop: the vision graph's (B, N) output its prefill reads the key set from
TOKENS_READ = "tokens_per_layer"  # MustDrop's prefill: (L,) int64, the tokens each layer read
LLM_PROMPT_LAYOUT = ("image_start", "prompt_tokens")  # DyRate's decode step: (1,) int64 each
KEPT_IMAGES = "image_kept"  # DyRate: past./present.image_kept (B, n) int64, the image tokens layers K.. still hold
TOKEN_SIZES = "token_sizes"  # (B, N_final): patches each output token stands for, the merge fingerprint


def cache_names(prefix: str, layers: int, kinds: tuple[str, ...]) -> list[str]:
    """Key/value cache tensor names layer by layer: past.0.self.key, past.0.self.value, ... (prefix
    "past" or "present"; kinds as each decoder names its caches)."""
    return [f"{prefix}.{i}.{kind}" for i in range(layers) for kind in kinds]
