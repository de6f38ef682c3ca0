"""Fold each layer's weighted merge into one `turbo::TurboMerge` node backed by a model-local
function (one overload per layer). ONNX Runtime inlines the function, so the file computes
exactly what the plain graph does; TensorRT can map the node to a plugin (`plugin_namespace`)
or import the function body as native layers.

The subgraph of a layer is every node the exporter scoped to its WeightedMerge module; the
scoring and the two TopK in front of it stay native. The node's interface is the plugin's:
inputs (x (B, N, C), size (B, N, 1), index (B, Na + r) int64), outputs (x (B, N - r, C),
size (B, N - r, 1)); attribute r is the token count in minus out.
"""

import re
from collections import defaultdict

import onnx
from onnx import helper

from turbo.graph.summary import SCOPES_KEY, WEIGHTED_MERGE_CLASS, module_scope

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


def _value_types(graph: onnx.GraphProto) -> dict[str, onnx.TypeProto]:
    """Tensor types of initializers and of what the exporter recorded (every intermediate)."""
    types = {init.name: helper.make_tensor_type_proto(init.data_type, init.dims) for init in graph.initializer}
    return types | {v.name: v.type for v in [*graph.input, *graph.value_info, *graph.output]}


def _dims(value: onnx.TypeProto) -> tuple[int, ...]:
    return tuple(d.dim_value for d in value.tensor_type.shape.dim)


def _merge_inputs(outside: list[str], types: dict[str, onnx.TypeProto], constants: set[str]) -> list[str]:
    """(x, size, index) among the tensors the block reads: the index is the integer input, x the
    float input with channels, size the (B, N, 1) tensor (a constant when the exporter folded
    all-ones sizes for a static batch)."""
    def is_float(name: str) -> bool:
        return types[name].tensor_type.elem_type != onnx.TensorProto.INT64

    runtime = [name for name in outside if name not in constants]
    index = [name for name in runtime if not is_float(name)]
    x = [name for name in runtime if is_float(name) and _dims(types[name])[-1] != 1]
    if len(index) == 1 and len(x) == 1:
        tokens = _dims(types[x[0]])[1]
        size = [name for name in outside if is_float(name) and _dims(types[name])[1:] == (tokens, 1)]
        if len(size) == 1:
            return [x[0], size[0], index[0]]
    raise ValueError(f"a weighted merge should read x, size and index, not {outside}")


def _merge_outputs(names: list[str], types: dict[str, onnx.TypeProto]) -> list[str]:
    """(x, size): size has a last dimension of 1."""
    if len(names) != 2 or sorted(_dims(types[name])[-1] == 1 for name in names) != [False, True]:
        raise ValueError(f"a weighted merge should give x and size, not {names}")
    return sorted(names, key=lambda name: _dims(types[name])[-1] == 1)


def _batch_size_nodes(name: str, producers: dict[str, onnx.NodeProto]) -> list[onnx.NodeProto] | None:
    """The nodes computing `name` when it is the batch size the exporter took from some tensor's
    shape: Shape(t, start=0, end=1), optionally Squeezed to a scalar; otherwise None."""
    node = producers.get(name)
    chain = []
    if node is not None and node.op_type == "Squeeze":
        chain.append(node)
        node = producers.get(node.input[0])
    if node is None or node.op_type != "Shape":
        return None
    if {a.name: helper.get_attribute_value(a) for a in node.attribute} != {"start": 0, "end": 1}:
        return None
    return [node, *chain]


def _batch_size_from(x: str, nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """`nodes` (from `_batch_size_nodes`) reading the shape of x instead: dimension 0 is the batch
    of every tensor here, so the function stays self-contained (x, size, index)."""
    copies = [onnx.NodeProto.FromString(node.SerializeToString()) for node in nodes]
    copies[0].input[0] = x
    return copies


def _absorb_rewritten_nodes(graph: onnx.GraphProto, blocks: dict[str, list[int]], constants: set[str]) -> None:
    """Add to a block the nodes the exporter's optimizer rewrote without scope metadata (a Concat
    left when an empty input was dropped, say) that read only that block's outputs."""
    producer_block = {name: scope for scope, indices in blocks.items()
                      for i in indices for name in graph.node[i].output}
    member = {i for indices in blocks.values() for i in indices}
    for index, node in enumerate(graph.node):
        if index in member or any(p.key == SCOPES_KEY for p in node.metadata_props):
            continue
        sources = {producer_block.get(name) for name in node.input if name and name not in constants}
        if len(sources) == 1 and None not in sources:
            scope = sources.pop()
            blocks[scope].append(index)
            member.add(index)
            producer_block.update({name: scope for name in node.output})


def fold_merge_blocks(model: onnx.ModelProto, kernel: str) -> onnx.ModelProto:
    """A copy of `model` (weights loaded) with one TurboMerge node per merge block."""
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    graph = folded.graph
    initializers = {init.name: init for init in graph.initializer}
    blocks: dict[str, list[int]] = defaultdict(list)
    for index, node in enumerate(graph.node):
        scope = module_scope(node, WEIGHTED_MERGE_CLASS)
        if scope is not None:
            blocks[scope].append(index)
    if not blocks:
        return folded
    _absorb_rewritten_nodes(graph, blocks, set(initializers))
    block_of = {index: scope for scope, indices in blocks.items() for index in indices}
    consumers: dict[str, set[str | None]] = defaultdict(set)  # tensor -> blocks (None: outside any) reading it
    for index, node in enumerate(graph.node):
        for name in node.input:
            consumers[name].add(block_of.get(index))
    for output in graph.output:
        consumers[output.name].add(None)
    types = _value_types(graph)
    producers = {name: node for node in graph.node for name in node.output}
    opsets = [helper.make_opsetid(o.domain, o.version) for o in folded.opset_import]
    replaced: dict[str, onnx.NodeProto] = {}
    for scope, indices in blocks.items():
        nodes = [graph.node[i] for i in indices]
        produced = [name for node in nodes for name in node.output]
        outside = list(dict.fromkeys(name for node in nodes for name in node.input if name and name not in produced))
        batch_sizes = {name: _batch_size_nodes(name, producers) for name in outside if name not in initializers}
        inputs = _merge_inputs([name for name in outside if not batch_sizes.get(name)], types, set(initializers))
        constants = [name for name in outside if name in initializers and name not in inputs]
        outputs = _merge_outputs([name for name in produced if consumers[name] - {scope}], types)  # read outside
        body = [helper.make_node("Constant", [], [name], value=initializers[name]) for name in constants]
        body += [node for nodes in batch_sizes.values() if nodes for node in _batch_size_from(inputs[0], nodes)]
        body += [onnx.NodeProto.FromString(node.SerializeToString()) for node in nodes]
        r = _dims(types[inputs[0]])[1] - _dims(types[outputs[0]])[1]  # tokens in - tokens out
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
