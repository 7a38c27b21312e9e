"""Module paths as scopes: the key both kinds of model are paired on.

torch.onnx's exporter names every node ``/<scope>/<OpType>[_N]``, where the
scope has one component per module call on the stack, each component being
the module's qualified name from its last non-numeric atom on
(``pts_backbone.blocks.0.0`` is written ``blocks.0.0``). A PyTorch model's
hooks rebuild the same string from their own call stack, so a module's output
in PyTorch and the tensors leaving its scope in ONNX carry the same key, and
passes that keep a module's name keep its key.
"""

from __future__ import annotations

import re

_QUANTIZER = re.compile(r"(^|_)quantizer(_\d+)?$")


def component(qualified_name: str) -> str:
    """The scope component the exporter writes for a module named ``qualified_name``."""
    atoms = qualified_name.split(".")
    for i in range(len(atoms) - 1, -1, -1):
        if not atoms[i].isnumeric():
            return ".".join(atoms[i:])
    return qualified_name


def node_scope(node_name: str) -> str | None:
    """The scope of an exported node, or None for nodes made outside any module."""
    if not node_name.startswith("/") or "/" not in node_name[1:]:
        return None
    return node_name.rsplit("/", 1)[0]


def ancestors(scope: str) -> list[str]:
    """``/a/b/c`` -> [``/a``, ``/a/b``, ``/a/b/c``]."""
    parts = scope.split("/")[1:]
    return ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]


def within(scope: str | None, outer: str) -> bool:
    return scope is not None and (scope == outer or scope.startswith(outer + "/"))


def is_quantizer(scope: str) -> bool:
    """A fake-quant quantizer's own scope (``.../input_quantizer``): its Q/DQ pair is read
    as the value of the tensor it quantizes, not as a layer."""
    return any(_QUANTIZER.search(part) for part in scope.split("/")[1:])


def module_path(scope: str) -> str:
    """The dotted module path a scope was written from (``/pts_backbone/blocks.0/blocks.0.0``
    -> ``pts_backbone.blocks.0.0``): each component repeats its parent's numeric tail. A container
    whose forward never runs (a head calling ``self.transformer.encoder`` directly) leaves no
    component, so the path misses it: rows take the PyTorch side's own names where there is one."""
    path = ""
    for part in scope.split("/")[1:]:
        if not path:
            path = part
            continue
        atoms, parent = part.split("."), path.split(".")
        # The longest tail of the parent's path that the component starts with.
        overlap = 0
        for k in range(min(len(atoms) - 1, len(parent)), 0, -1):
            if parent[-k:] == atoms[:k]:
                overlap = k
                break
        path = ".".join(parent + atoms[overlap:])
    return path


def _matches(scope: str, path: str) -> bool:
    """Whether ``scope`` was written for the module at dotted ``path``: its components'
    atoms appear in the path in order, the last one ending it (containers whose forward
    never ran leave gaps)."""
    atoms = path.split(".")
    i = 0
    parts = scope.split("/")[1:]
    for k, part in enumerate(parts):
        want = part.split(".")
        while i + len(want) <= len(atoms) and atoms[i:i + len(want)] != want:
            if k == len(parts) - 1:
                i += 1
                continue
            i += 1
        if i + len(want) > len(atoms):
            return False
        i += len(want)
    return i == len(atoms)


def recover_scopes(nodes, initializers: set[str], outputs: set[str] = frozenset()) -> list[str | None]:
    """Each node's scope; for nodes an optimiser renamed (onnxsim rewrites a Linear's MatMul
    and Add as Reshape -> Gemm -> Reshape named ``Gemm_11``), the scope is recovered from the
    module path in its parameters' names (``...value_proj.bias``), and the Reshapes around
    such a node take its scope. onnxsim also merges equal initializers, so a parameter may
    carry another layer's name (BEVFormer's sampling offsets start equal in every layer):
    a recovered scope is kept only where the node's output is read inside the module that
    owns it."""
    scopes = [node_scope(n.name) for n in nodes]
    known = {a for s in scopes if s for a in ancestors(s)}
    by_depth = sorted(known, key=lambda s: -s.count("/"))
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    readers: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for x in n.input:
            readers.setdefault(x, []).append(i)

    def read_in(tensor: str, depth: int = 0) -> list[str | None]:
        """The scopes reading ``tensor``, looking through unnamed Reshapes."""
        found = ["<output>"] if tensor in outputs else []
        for r in readers.get(tensor, []):
            if scopes[r] is None and nodes[r].op_type == "Reshape" and depth < 3:
                found += read_in(nodes[r].output[0], depth + 1)
            else:
                found.append(scopes[r])
        return found

    for i, n in enumerate(nodes):
        if scopes[i] is not None or n.op_type == "Constant":
            continue
        params = [x for x in n.input if x in initializers and x.rsplit(".", 1)[-1] in ("weight", "bias")]
        if not params:
            continue
        path = params[0].rsplit(".", 1)[0]
        own = component(path)
        parent = path[: len(path) - len(own)].rstrip(".")
        outer = next((s for s in by_depth if parent and _matches(s, parent)), None)
        where = [w for w in read_in(n.output[0]) if w is not None]
        if outer is not None and where and all(w == "<output>" or within(w, outer) for w in where):
            scopes[i] = f"{outer}/{own}"
    recovered = {i for i, n in enumerate(nodes) if scopes[i] is not None and node_scope(n.name) is None}
    for _ in range(2):  # the Reshape after a Gemm, then the one before it
        for i, n in enumerate(nodes):
            if scopes[i] is not None or n.op_type != "Reshape":
                continue
            src = producer.get(n.input[0])
            if src in recovered:
                scopes[i] = scopes[src]
                recovered.add(i)
                continue
            dst = readers.get(n.output[0], [])
            if len(dst) == 1 and dst[0] in recovered:
                scopes[i] = scopes[dst[0]]
                recovered.add(i)
    return scopes
