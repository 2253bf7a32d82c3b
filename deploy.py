"""A trained grader as one self-describing ONNX file: the graph (uint8 images in, normalisation inside,
grade probabilities out), INT8 quantisation, the metadata it carries, and the onnxruntime session that runs it.

export.py writes such files, evaluate.py runs them exactly as it runs a checkpoint, bench.py times them.
onnx, onnxruntime and onnxscript (torch's exporter) are imported only here and only when a file is made
or run: a user who only trains never installs them (requirements-deploy.txt).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

import dataloader
import objectives
from runtime import UserError

# Pinned so that a file's graph does not depend on the torch release that wrote it; 18 is what torch's
# exporter (torch.export based, the default since torch 2.9) writes natively, and onnxruntime 1.16+ runs it.
OPSET = 18
INPUT, OUTPUT = "images", "probabilities"
# The two-eye model's further inputs: the partner's photo and whether it is one (twoeye.py)
PARTNER_INPUTS = ("partner_images", "has_partner")
ONNX_SUFFIX = ".onnx"
INSTALL_HINT = "pip install -r requirements-deploy.txt"


def require(what: str):
    """(onnx, onnxruntime), or one sentence saying how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise UserError(f"{what} needs onnx and onnxruntime, which a training install leaves out "
                        f"({err.name} is missing): {INSTALL_HINT}") from None
    return onnx, onnxruntime


def is_onnx_file(path) -> bool:
    return Path(path).suffix.lower() == ONNX_SUFFIX


# --------------------------------------------------------------------------- the graph
class GradeSummaries(nn.Module):
    """What a camera gives in, what a clinic reads out: uint8 RGB [N, 3, S, S] -> the objective's summaries
    (objectives.Objective.summarise: grade probabilities [N, 5], or a regression's grade [N, 1]). The
    normalisation is dataloader.BatchTransform's (evaluation mode), so the file needs no preprocessing code
    beyond decoding and resizing."""

    def __init__(self, model: nn.Module, objective: objectives.Objective):
        super().__init__()
        self.model, self.objective = model, objective
        self.register_buffer("mean", torch.tensor(dataloader.IMAGENET_MEAN).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(dataloader.IMAGENET_STD).view(1, 3, 1, 1) * 255)

    def forward(self, images: torch.Tensor, partner_images: torch.Tensor | None = None,
                has_partner: torch.Tensor | None = None) -> torch.Tensor:
        """images; for the two-eye model also partner_images (uint8, the same shape) and has_partner (float [N],
        1 where partner_images holds the patient's other eye, 0 where the eye is graded alone)."""
        normalise = lambda x: (x.float() - self.mean) / self.std  # noqa: E731
        if partner_images is not None:
            return self.objective.summarise(self.model(normalise(images), normalise(partner_images), has_partner))
        return self.objective.summarise(self.model(normalise(images)))


def output_name(objective: objectives.Objective) -> str:
    """The graph's output: `probabilities` [N, 5], or `grade` [N, 1] for a regression."""
    return OUTPUT if objective.probabilities else "grade"


def export_fp32(model: nn.Module, image_size: int, objective: objectives.Objective = objectives.OBJECTIVES["ce"],
                two_eye: bool = False):
    """The model (eval mode, CPU, fp32) as an ONNX ModelProto with a dynamic batch, through torch's exporter
    (which folds BatchNorm into the convolutions)."""
    import contextlib
    import io
    import warnings

    require("export")
    wrapped = GradeSummaries(model, objective).cpu().float().eval()
    example = (torch.zeros(2, 3, image_size, image_size, dtype=torch.uint8),)
    names = [INPUT]
    if two_eye:
        example += (example[0].clone(), torch.ones(2))
        names += list(PARTNER_INPUTS)
    batch = torch.export.Dim("batch")
    # the exporter narrates its steps on stdout and warns about its own internals; export.py prints the result
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(wrapped, example, dynamo=True, opset_version=OPSET, input_names=names,
                                    output_names=[output_name(objective)],
                                    dynamic_shapes={name: {0: batch} for name in names},
                                    verbose=False)
    proto = program.model_proto
    # the exporter's intermediate shapes disagree with onnx's own inference in places (onnxruntime's quantiser
    # then stops: "Inferred shape and existing shape differ"); they are optional, and every consumer infers them
    del proto.graph.value_info[:]
    proto.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    return proto


# --------------------------------------------------------------------------- INT8
def quantise_dynamic(proto):
    """INT8 weights, activations quantised on the fly per batch (no calibration)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="quantise-") as tmp:
        source, prepared, target = (Path(tmp) / name for name in ("fp32.onnx", "prepared.onnx", "int8.onnx"))
        source.write_bytes(proto.SerializeToString())
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_dynamic(prepared, target, weight_type=QuantType.QInt8, per_channel=True)
        return target.read_bytes()


def quantise_static(proto, calibration: list[np.ndarray]):
    """INT8 weights (per channel) and activations (QDQ, ranges calibrated on `calibration`, uint8 batches of
    training images); the softmax stays fp32, so probabilities are exact given the logits."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        """The calibration batches, handed over a stretch at a time (CalibStridedMinMax below)."""

        def __init__(self):
            self.set_range(0, len(calibration))

        def __len__(self):
            return len(calibration)

        def set_range(self, start_index: int, end_index: int):
            self.batches = iter(calibration[start_index:end_index])

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else feed(batch)

    with tempfile.TemporaryDirectory(prefix="quantise-") as tmp:
        source, prepared, target = (Path(tmp) / name for name in ("fp32.onnx", "prepared.onnx", "int8.onnx"))
        onnx.save(proto, source)
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_static(prepared, target, Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["Conv", "Gemm", "MatMul", "Add", "Relu", "MaxPool",
                                              "GlobalAveragePool", "Flatten"],
                        calibrate_method=CalibrationMethod.MinMax,
                        # ranges taken batch by batch and merged: the calibrator otherwise keeps every tensor of
                        # every image (about 0.5 GB per image for ResNet50 at 512 px). Not CalibMaxIntermediate-
                        # Outputs: onnxruntime 1.31 drops the collected tensors there without taking their ranges
                        extra_options={"CalibStridedMinMax": 1})
        return target.read_bytes()


# --------------------------------------------------------------------------- metadata
def with_metadata(model_bytes: bytes, metadata: dict) -> bytes:
    """The file with metadata_props set (plain strings stay, everything else as JSON), checked by onnx.checker."""
    import onnx

    proto = onnx.load_from_string(model_bytes)
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def read_metadata(path) -> dict:
    """An exported file's metadata_props, JSON values decoded."""
    _, ort = require(f"{path}")
    meta = session(path).get_modelmeta().custom_metadata_map
    out = {}
    for key, value in meta.items():
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def graph_digest(model) -> str:
    """sha256 of the weights an ONNX graph runs with (a ModelProto, a file path or the file's bytes): every
    initializer and every Constant node's tensor (names, dtypes, shapes and values, in name order), as
    runtime.weights_digest covers a checkpoint's. export.py folds BatchNorm into the convolutions (and --int8
    quantises them), so this digest differs from the checkpoint's: export.py records both, and evaluate.py
    recomputes this one from the file it runs. Metadata, names of nodes and the graph's structure are not
    covered."""
    import hashlib

    import onnx
    from onnx import numpy_helper

    if isinstance(model, (str, Path)):
        model = onnx.load(str(model), load_external_data=False)
    elif isinstance(model, (bytes, bytearray)):
        model = onnx.load_from_string(bytes(model))
    tensors = {}

    def collect(graph, prefix: str) -> None:
        for tensor in graph.initializer:
            tensors[f"{prefix}{tensor.name}"] = tensor
        for sparse in graph.sparse_initializer:
            tensors[f"{prefix}{sparse.values.name}:sparse"] = sparse
        for i, node in enumerate(graph.node):
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.TENSOR:
                    tensors[f"{prefix}{node.name or i}.{attribute.name}"] = attribute.t
                for sub in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs:
                    collect(sub, f"{prefix}{node.name or i}.{attribute.name}/")

    collect(model.graph, "")
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name]
        if isinstance(tensor, onnx.SparseTensorProto):
            values = [numpy_helper.to_array(tensor.values), numpy_helper.to_array(tensor.indices)]
        else:
            values = [numpy_helper.to_array(tensor)]
        for array in values:
            array = np.ascontiguousarray(array)
            digest.update(f"{name}:{array.dtype}:{tuple(array.shape)}\n".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- running it
def session(model, threads: int | None = None):
    """An onnxruntime CPU session of a file path or the file's bytes, with every graph optimisation on."""
    _, ort = require("running an ONNX model")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # its warnings about unused initialisers are no concern of the user's
    if threads:
        options.intra_op_num_threads = threads
    source = str(model) if isinstance(model, (str, Path)) else model
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own classes for foreign or truncated bytes
        if isinstance(model, (str, Path)):
            raise UserError(f"cannot read {model}: not an ONNX model onnxruntime can run "
                            f"({' '.join(str(err).split())[:160]})") from None
        raise


def feed(images) -> dict:
    """The file's inputs: a uint8 [N, 3, S, S] batch, or for the two-eye model (eyes, partners, flags)."""
    if isinstance(images, (tuple, list)):
        eyes, partners, flags = images
        return {INPUT: np.ascontiguousarray(eyes, dtype=np.uint8),
                PARTNER_INPUTS[0]: np.ascontiguousarray(partners, dtype=np.uint8),
                PARTNER_INPUTS[1]: np.ascontiguousarray(flags, dtype=np.float32)}
    return {INPUT: np.ascontiguousarray(images, dtype=np.uint8)}


def run(sess, images) -> np.ndarray:
    """The file's output (the objective's summaries, float32 [N, 5] or [N, 1]) of a uint8 [N, 3, S, S] batch
    (for the two-eye model: eyes, partners, flags)."""
    return sess.run(None, feed(images))[0]
