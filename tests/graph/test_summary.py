"""Reading an exported graph back: merge blocks are found by the exporter's module metadata,
including in exports made before the code moved into the turbo package."""

import onnx
import pytest
from onnx import helper

from turbo.graph.summary import MERGE_CLASS, SCOPES_KEY, merge_scope


def node_from(module_class: str) -> onnx.NodeProto:
    node = helper.make_node("TopK", ["x", "k"], ["values", "indices"])
    for key, value in ((SCOPES_KEY, "['', 'vit.layers.3.turbo_merge']"),
                       ("pkg.torch.onnx.class_hierarchy", f"['Model', '{module_class}']")):
        entry = node.metadata_props.add()
        entry.key, entry.value = key, value
    return node


@pytest.mark.parametrize("module_class", [MERGE_CLASS, MERGE_CLASS.removeprefix("turbo.")])
def test_merge_blocks_are_found_by_module_class(module_class):
    assert merge_scope(node_from(module_class)) == "vit.layers.3.turbo_merge"


def test_other_modules_are_not_merge_blocks():
    assert merge_scope(node_from("transformers.models.vit.modeling_vit.ViTLayer")) is None
    assert merge_scope(helper.make_node("TopK", ["x", "k"], ["v", "i"])) is None
