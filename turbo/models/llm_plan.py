"""The language model's side of an LLM-based VLM's plan: image tokens per LLM layer and the
prefill and decode FLOPs bounds, against the unmerged, unreduced model."""

from dataclasses import asdict, dataclass

from turbo.core.errors import UsageError
from turbo.merging.llm_drop import LlmDropConfig, decode_flops, image_tokens_per_layer, llm_layer_flops, prefill_flops
from turbo.models.build import BuiltPlan

DEFAULT_TEXT_TOKENS = 40  # a prompt's text: its template and a short question


@dataclass(frozen=True)
class LlmPlan:
    drop: LlmDropConfig
    text_tokens: int  # the prompt's tokens besides the image's
    unmerged_image_tokens: int  # at r=0
    image_per_layer: tuple[int, ...]  # image tokens each LLM layer sees (the first: the vision merge's output)
    hidden_size: int
    intermediate_size: int
    mlp_matrices: int  # 3 gated (LLaMA-style), 2 plain (OPT)

    @property
    def _widths(self) -> tuple[int, int, int]:
        return self.hidden_size, self.intermediate_size, self.mlp_matrices

    def layer_flops(self, image_tokens: int) -> int:
        """One LLM layer's prefill FLOPs with `image_tokens` in it."""
        return llm_layer_flops(self.text_tokens + image_tokens, *self._widths)

    @property
    def image_tokens(self) -> int:
        return self.image_per_layer[0]

    @property
    def prefill_flops(self) -> int:
        return prefill_flops(self.text_tokens, list(self.image_per_layer), *self._widths)

    @property
    def baseline_prefill_flops(self) -> int:
        return prefill_flops(self.text_tokens, [self.unmerged_image_tokens] * len(self.image_per_layer),
                             *self._widths)

    @property
    def decode_flops(self) -> int:
        """The first decoded token's: each layer's cache holds its text and image tokens and itself."""
        return decode_flops([self.text_tokens + n + 1 for n in self.image_per_layer], *self._widths)

    @property
    def baseline_decode_flops(self) -> int:
        cached = self.text_tokens + self.unmerged_image_tokens + 1
        return decode_flops([cached] * len(self.image_per_layer), *self._widths)

    def to_dict(self) -> dict:
        return {"llm_drop": self.drop.label, "llm_drop_settings": asdict(self.drop), "text_tokens": self.text_tokens,
                "image_tokens": self.image_tokens, "unmerged_image_tokens": self.unmerged_image_tokens,
                "image_tokens_per_llm_layer": list(self.image_per_layer),
                "prefill_flops": self.prefill_flops, "baseline_prefill_flops": self.baseline_prefill_flops,
                "decode_flops": self.decode_flops, "baseline_decode_flops": self.baseline_decode_flops}


def llm_plan(built: BuiltPlan, drop: LlmDropConfig, text_tokens: int = DEFAULT_TEXT_TOKENS) -> LlmPlan:
    """The LLM's plan for a built (vision) plan; UsageError for a model without a language model or a
    reduction that cannot run on it."""
    source = built.source
    language = source.adapter.language_model
    if language is None:
        raise UsageError(f"{source.name} has no language model reading its image tokens ({source.adapter.family}); "
                         "--llm-drop is for LLM-based VLMs (llava, blip2)")
    if drop.method == "mustdrop" and (language.cls_attention is None
                                      or not source.adapter.has_cls_token(source.config)):
        what = "its image tokens are not the tower's" if language.cls_attention is None else "its tower has no CLS"
        raise UsageError(f"--llm-drop mustdrop: MustDrop's key set is the vision tower's CLS attention on the image "
                         f"tokens, and {source.name} has none ({what}); use fastv, pyramid or dyrate")
    if drop.method == "mustdrop" and drop.window:
        _check_spatial_merge(built, drop)
    text = language.text_config(source.config)
    merged = language.image_tokens(source.config, built.plan.final_tokens)
    unmerged = language.image_tokens(source.config, built.plan.tokens_in)
    try:
        per_layer = image_tokens_per_layer(drop, text.num_hidden_layers, merged)
    except ValueError as exc:
        raise UsageError(f"--llm-drop {drop.label}: {exc}") from None
    return LlmPlan(drop, text_tokens, unmerged, tuple(per_layer), text.hidden_size, *language.mlp(text))


def _check_spatial_merge(built: BuiltPlan, drop: LlmDropConfig) -> None:
    """MustDrop's spatial merge windows the tower's patch grid after its first block: the grid must
    split into whole windows and no vision merge may reorder the tokens first."""
    height, width = built.image_size
    patch_h, patch_w = built.source.adapter.patch_size(built.source.config)
    grid = (height // patch_h, width // patch_w)
    if grid[0] % drop.window or grid[1] % drop.window:
        raise UsageError(f"--llm-drop mustdrop: its spatial merge needs the {grid[0]}×{grid[1]} patch grid to split "
                         f"into {drop.window}×{drop.window} windows; set window to a divisor, or window=0")
    if any(built.plan.r):
        raise UsageError("--llm-drop mustdrop: its spatial merge is MustDrop's own vision-stage reduction, on the "
                         "tower's unmerged grid: use --r 0, or window=0 to keep the vision merge")
