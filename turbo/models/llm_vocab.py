"""The language side of an LLM-based VLM's config: the special token ids it relies on, and a
made-up byte-level vocabulary around them for random-weight runs."""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

IMAGE_TOKEN = "<image>"


def special_ids(config) -> dict[str, int]:
    """The image placeholder's id and the language model's eos, bos and pad ids, where it has them."""
    text = config.text_config
    ids = {"image_token_id": config.image_token_id, "eos_token_id": text.eos_token_id,
           "bos_token_id": text.bos_token_id, "pad_token_id": text.pad_token_id}
    return {name: value[0] if isinstance(value, list) else value for name, value in ids.items() if value is not None}


def placeholder_tokenizer(config) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer without merges: the model's special ids (the image placeholder, end and
    start of text) where its config puts them, the 256 byte symbols at the lowest free ids, made-up
    words ("w123") up to the largest special id (so that every id it relies on is in range)."""
    ids = special_ids(config)
    special = {}  # one symbol per id: OPT starts and ends text with one token
    for name, value in ids.items():
        if value not in special.values():
            special[IMAGE_TOKEN if name == "image_token_id" else f"<{name.removesuffix('_token_id')}>"] = value
    taken = set(special.values())
    free = (index for index in range(max(taken) + 1) if index not in taken)
    vocab = {symbol: next(free) for symbol in bytes_to_unicode().values()}
    vocab.update({f"w{index}": index for index in free})
    vocab.update(special)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    names = {value: name for name, value in special.items()}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, extra_special_tokens={"image_token": IMAGE_TOKEN},
        eos_token=names[ids["eos_token_id"]], pad_token=names.get(ids.get("pad_token_id", -1)),
        additional_special_tokens=list(special))
