"""The patched encoders export with torch's dynamo exporter to static-shape ONNX that ONNX
Runtime runs like PyTorch. A guard for the merging core's export-friendliness; the full
`turbo export` command is issue 3."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tests.conftest import tiny_pair


class EncoderOutput(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = model.vision_model if hasattr(model, "vision_model") else model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.encoder(pixel_values=pixel_values)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def constant_names(graph: onnx.GraphProto) -> set[str]:
    names = {init.name for init in graph.initializer}
    return names | {out for node in graph.node if node.op_type == "Constant" for out in node.output}


@pytest.mark.parametrize("model_name", ["vit-b16", "blip-caption"])
def test_merged_encoder_exports_and_matches_ort(model_name, tmp_path):
    merged, _, _, built = tiny_pair(model_name, r=4, kernel="matmul")
    wrapper = EncoderOutput(merged).eval()
    size = built.source.adapter.image_size(built.source.config)
    program = torch.onnx.export(
        wrapper, (torch.randn(2, 3, size, size),), dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch")}},
        input_names=["pixel_values"], output_names=["output"],
    )
    path = tmp_path / "model.onnx"
    program.save(str(path))
    graph = onnx.load(str(path)).graph
    ops = [node.op_type for node in graph.node]
    assert "ScatterND" not in ops and "ScatterElements" not in ops
    topks = [node for node in graph.node if node.op_type == "TopK"]
    assert len(topks) == 2 * sum(1 for r in built.plan.r if r > 0)
    assert all(node.input[1] in constant_names(graph) for node in topks)  # every K is a constant
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = wrapper(x).numpy()
        got = session.run(None, {"pixel_values": x.numpy()})[0]
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    if model_name.startswith("blip"):
        dims = graph.output[0].type.tensor_type.shape.dim
        assert dims[1].dim_value == built.plan.final_tokens  # token dim static and as planned
