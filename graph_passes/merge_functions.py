"""Fold each layer's merge subgraph into one `turbo::TurboMerge` node backed by a model-local
function (one overload per layer). ONNX Runtime inlines the function, so the file computes
exactly what the plain graph does; TensorRT can map the node to a plugin (`plugin_namespace`)
or import the function body as native layers.

The subgraph of a layer is every node the exporter scoped to its TokenMerge module.
"""

import re
from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graph_passes.summary import merge_scope

DOMAIN = "turbo"
OP_TYPE = "TurboMerge"
PLUGIN_NAMESPACE = "turbo"
MERGE_OPS = ("function", "inline")


def _topological(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    ordered, pending, ready = [], list(nodes), set(available)
    while pending:
        progressed = [n for n in pending if all(not i or i in ready for i in n.input)]
        if not progressed:
            raise ValueError("the folded graph has a cycle or a missing input")
        for node in progressed:
            ordered.append(node)
            ready.update(node.output)
        pending = [n for n in pending if n not in progressed]
    return ordered


def fold_merge_blocks(model: onnx.ModelProto, kernel: str) -> onnx.ModelProto:
    """A copy of `model` (weights loaded) with one TurboMerge node per merge block."""
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    graph = folded.graph
    initializers = {init.name: init for init in graph.initializer}
    blocks: dict[str, list[int]] = defaultdict(list)
    for index, node in enumerate(graph.node):
        scope = merge_scope(node)
        if scope is not None:
            blocks[scope].append(index)
    if not blocks:
        return folded
    block_of = {index: scope for scope, indices in blocks.items() for index in indices}
    consumers: dict[str, set[str | None]] = defaultdict(set)  # tensor -> blocks (None: outside any) reading it
    for index, node in enumerate(graph.node):
        for name in node.input:
            consumers[name].add(block_of.get(index))
    for output in graph.output:
        consumers[output.name].add(None)
    opsets = [helper.make_opsetid(o.domain, o.version) for o in folded.opset_import]
    replaced: dict[str, onnx.NodeProto] = {}
    for scope, indices in blocks.items():
        nodes = [graph.node[i] for i in indices]
        produced = [name for node in nodes for name in node.output]
        inputs = list(dict.fromkeys(name for node in nodes for name in node.input
                                    if name and name not in produced and name not in initializers))
        constants = list(dict.fromkeys(name for node in nodes for name in node.input if name in initializers))
        outputs = [name for name in produced if consumers[name] - {scope}]  # read by the rest of the graph
        body = [helper.make_node("Constant", [], [name], value=initializers[name]) for name in constants]
        body += [onnx.NodeProto.FromString(node.SerializeToString()) for node in nodes]
        topk = next(node for node in nodes if node.op_type == "TopK")
        r = int(np.asarray(numpy_helper.to_array(initializers[topk.input[1]])).reshape(-1)[0]) \
            if topk.input[1] in initializers else -1
        overload = re.sub(r"\W", "_", scope)
        function = helper.make_function(DOMAIN, OP_TYPE, inputs, outputs, body, opsets,
                                        attributes=["r", "kernel", "plugin_namespace"])
        function.overload = overload
        folded.functions.append(function)
        node = helper.make_node(OP_TYPE, inputs, outputs, name=f"{scope}/TurboMerge", domain=DOMAIN, r=r,
                                kernel=kernel, plugin_namespace=PLUGIN_NAMESPACE)
        node.overload = overload
        replaced[scope] = node
    kept, placed = [], set()
    for index, node in enumerate(graph.node):
        scope = block_of.get(index)
        if scope is None:
            kept.append(node)
        elif scope not in placed:
            placed.add(scope)
            kept.append(replaced[scope])
    available = {v.name for v in graph.input} | set(initializers)
    ordered = _topological(kept, available)
    del graph.node[:]
    graph.node.extend(ordered)
    still_used = {name for node in graph.node for name in node.input}
    remaining = [init for init in graph.initializer if init.name in still_used]
    del graph.initializer[:]
    graph.initializer.extend(remaining)
    folded.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return folded
