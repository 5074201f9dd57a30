"""Small helpers for rewriting an exported ``onnx.GraphProto``: an index of who produces and who reads each value,
and one-pass node replacement (used by :mod:`kvexport.export.onnx_q4`, :mod:`kvexport.export.onnx_fuse` and the
state aliasing of :mod:`kvexport.export.onnx`)."""

from __future__ import annotations


class GraphIndex:
    """Producer and consumers (distinct nodes) of every value of ``graph``, its outputs, and initializer values."""

    def __init__(self, graph):
        from onnx import numpy_helper

        self.inits = {t.name: t for t in graph.initializer}
        self.to_array = numpy_helper.to_array
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in graph.node:
            for i in dict.fromkeys(n.input):
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in graph.output}

    def op(self, value: str, op_type: str):
        """The standard-domain ``op_type`` node producing ``value``, or None."""
        node = self.producer.get(value)
        return node if node is not None and node.op_type == op_type and node.domain == "" else None

    def const(self, value: str):
        """The initializer ``value`` as a numpy array, or None."""
        return self.to_array(self.inits[value]) if value in self.inits else None

    def private(self, value: str) -> bool:
        """Whether ``value`` has exactly one consumer and is no graph output."""
        return len(self.consumers.get(value, ())) == 1 and value not in self.outputs

    def ancestors(self, node) -> set[int]:
        """``id`` of every node ``node`` depends on."""
        seen, todo = set(), [node]
        while todo:
            for i in todo.pop().input:
                up = self.producer.get(i)
                if up is not None and id(up) not in seen:
                    seen.add(id(up))
                    todo.append(up)
        return seen


def replace_nodes(graph, edits: list[tuple[list, list]]) -> None:
    """Apply ``edits`` (old nodes, new nodes) to ``graph`` in one pass: each edit's new nodes take the place of
    its first old node in graph order (their inputs must be produced before it), its old nodes go."""
    current = list(graph.node)  # held, so every node keeps its Python object (and id) while we work
    order = {id(n): i for i, n in enumerate(current)}
    place = {id(min(old, key=lambda n: order[id(n)])): new for old, new in edits}
    drop = {id(n) for old, _ in edits for n in old}
    nodes = []
    for n in current:
        nodes += place.get(id(n), [])
        if id(n) not in drop:
            nodes.append(n)
    del graph.node[:]
    graph.node.extend(nodes)
