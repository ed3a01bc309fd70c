"""A predictor that needs no PyTorch: ONNX Runtime (or OpenVINO), Pillow and NumPy only, over the
folder that ``imgclf export`` writes. Same manners as :class:`imgclf.predictors.pytorch.Classifier`
(``predict``, ``predict_proba``, ``classes_``, ``predict_files``) and the same preprocessing code,
so it gives the same answers. Importing this module never imports torch.

Which engine runs the model is decided by measurement: ``imgclf export`` times ONNX Runtime and
OpenVINO on the check images and checks OpenVINO's top-1 against fp32, and ``choose_backend``
follows that record only on a CPU with the same capabilities as the one measured.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import numpy as np

from imgclf.core.errors import BackendError, BundleError, batch_memory
from imgclf.core.meta import preprocessing, read_meta
from imgclf.core.numeric import softmax
from imgclf.core.settings import PREDICT_BATCH_SIZE
from imgclf.data.images import DEFAULT_MAX_PIXELS
from imgclf.data.preprocess import normalize
from imgclf.predictors.base import BasePredictor

FP32_FILE, INT8_FILE = "model.onnx", "model.int8.onnx"


def onnx_meta(folder: Path) -> dict:
    """The validated model.json of an export folder, which must say it is one."""
    meta = read_meta(folder)
    if "onnx" not in meta:
        raise BundleError(f"{folder / 'model.json'}: not written by imgclf export (no 'onnx' record)")
    return meta


def check_external_data(path: Path) -> None:
    """Refuse an ONNX file whose weights live in other files outside its folder, or reached
    through a symlink (BAD_INPUTS case 27): loading it would read whatever file it names. imgclf's
    own exports keep their weights inside. Needs the onnx package (installed with imgclf, not with
    the bare runtime, where ONNX Runtime's own checks apply)."""
    try:
        import onnx
    except ImportError:
        return
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # a damaged file: ONNX Runtime's loading says so, in its own words
        return
    folder = path.parent.resolve()
    tensors = list(model.graph.initializer) + [
        a.t for node in model.graph.node for a in node.attribute if a.type == onnx.AttributeProto.TENSOR
    ]
    for tensor in tensors:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        parts = Path(location).parts
        steps = [
            path.parent.joinpath(*parts[: i + 1]) for i in range(len(parts))
        ]  # each folder on the way, and the file
        inside = not os.path.isabs(location) and (path.parent / location).resolve().is_relative_to(folder)
        if not inside or any(step.is_symlink() for step in steps):
            raise BundleError(
                f"{path}: tensor '{tensor.name}' takes its data from '{location}', outside the model's folder "
                "or through a symlink; refused (export the model again, with its weights inside)"
            )


class OnnxClassifier(BasePredictor):
    """Predicts labels for photos with an exported ONNX bundle (fp32, or int8 with ``int8=True``)
    on ONNX Runtime."""

    backend = "onnx"

    def __init__(
        self,
        folder: str | os.PathLike,
        int8: bool = False,
        batch_size: int = PREDICT_BATCH_SIZE,
        threads: int = 0,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        folder = Path(folder)
        self.meta = onnx_meta(folder)
        name = INT8_FILE if int8 else FP32_FILE
        if not (folder / name).exists():
            raise BackendError(f"{folder / name}: not exported (imgclf export{' --int8' if int8 else ''})")
        self._open(folder / name, threads)
        self.preprocessing = preprocessing(self.meta)
        self.mean, self.std = self.preprocessing.mean, self.preprocessing.std
        self.max_pixels = max_pixels
        self.classes_ = np.array(self.meta["classes"], dtype=object)
        self.temperature = float(self.meta.get("temperature", 1.0))
        self.batch_size = batch_size
        self._stack = np.stack

    def _open(self, path: Path, threads: int) -> None:
        self.model_path = path
        check_external_data(path)
        self.session = self._session(threads)  # every core on one batch: the lowest latency
        self.input_name = self.session.get_inputs()[0].name
        outputs = self.session.get_outputs()[0].shape
        if isinstance(outputs[-1], int) and outputs[-1] != len(self.meta["classes"]):
            raise BundleError(
                f"{path}: the model gives {outputs[-1]} scores but model.json lists {len(self.meta['classes'])} "
                "classes; the export and its model.json do not belong together: export it again"
            )
        self._stream_session = None  # opened on the first job of several batches, see _batch_runner

    def _session(self, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        # Spinning threads would take the cores from the photo decoding that runs beside the model
        # (measured on 2 cores: 170 vs 160 img/s end to end).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            return ort.InferenceSession(str(self.model_path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ONNX Runtime's own types (InvalidProtobuf, Fail, ...) derive from Exception
            raise BundleError(f"{self.model_path}: ONNX Runtime cannot load it ({exc}); export it again") from None

    def _batch_runner(self, batches: int):
        """Two batches at once, each on half the cores, when a job has several: a batch on all
        cores waits at every layer for the core that the photo decoding took, two independent
        ones do not. Measured on 2 cores, files to top-5 against the faster raw ONNX Runtime in
        the same five rounds: 0.76-0.85x, against 0.67-0.77x one batch at a time. A job of one
        batch runs on every core (the lowest latency)."""
        cores = os.cpu_count() or 1
        if batches < 2 or cores < 2:
            return 1, self._proba_of_batch
        if self._stream_session is None:
            self._stream_session = self._session(cores // 2)
        return 2, partial(self._proba_of_batch, session=self._stream_session)

    def _input(self, item) -> np.ndarray:
        """One photo as a normalised float32 CHW array; normalising here, in the decode workers,
        keeps it off the thread that feeds the model."""
        return normalize(self._pixels(item), self.mean, self.std)

    def _logits(self, batch: np.ndarray, session=None) -> np.ndarray:
        with batch_memory(len(batch)):
            return (session or self.session).run(None, {self.input_name: batch})[0]

    def _proba_of_batch(self, batch: np.ndarray, session=None) -> np.ndarray:
        return softmax(self._logits(batch, session), self.temperature).astype(np.float32)


def cpu_capabilities() -> list[str]:
    """What OpenVINO sees in this CPU (BF16, INT8, FP16...): a recorded speed applies only where it matches."""
    import openvino as ov

    return sorted(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def openvino_precision() -> str:
    """bf16 where the CPU computes it natively (AMX / AVX-512 BF16), else fp32."""
    return "bf16" if "BF16" in cpu_capabilities() else "f32"


def compile_openvino(path: str | os.PathLike, precision: str | None = None, threads: int = 0):
    """The ONNX file compiled for the CPU by OpenVINO, and one inference request on it."""
    import openvino as ov

    config = {"INFERENCE_PRECISION_HINT": precision or openvino_precision(), "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = str(threads)
    core = ov.Core()
    return core.compile_model(core.read_model(str(path)), "CPU", config).create_infer_request()


class OpenVinoClassifier(OnnxClassifier):
    """The same exported ONNX model run by OpenVINO (bf16 where the CPU has it, see
    :func:`openvino_precision`); ``imgclf export`` records its agreement with fp32."""

    backend = "openvino"

    def _open(self, path: Path, threads: int) -> None:
        try:
            import openvino  # noqa: F401
        except ImportError:
            raise BackendError("the openvino backend needs OpenVINO: pip install 'imgclf[openvino]'") from None
        self.precision = openvino_precision()
        self.request = compile_openvino(path, self.precision, threads)

    def _logits(self, batch: np.ndarray, session=None) -> np.ndarray:
        with batch_memory(len(batch)):
            return self.request.infer({0: batch})[0].copy()

    def _batch_runner(self, batches: int):
        return 1, self._proba_of_batch  # one inference request, on every core


def choose_backend(folder: str | os.PathLike) -> str:
    """ "openvino" where export measured it faster than ONNX Runtime and in agreement with fp32 on
    a CPU with these same capabilities, and it is installed; otherwise "onnx"."""
    record = onnx_meta(Path(folder)).get("onnx", {}).get("openvino", {})
    if not record.get("recommended"):
        return "onnx"
    try:
        return "openvino" if cpu_capabilities() == record.get("cpu_capabilities") else "onnx"
    except ImportError:
        return "onnx"


def load_onnx(
    folder: str | os.PathLike,
    int8: bool = False,
    batch_size: int = PREDICT_BATCH_SIZE,
    backend: str = "onnx",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> OnnxClassifier:
    """Load an exported ONNX bundle folder (``RUN_DIR/onnx`` by default) for prediction, on ONNX
    Runtime (``backend="onnx"``), OpenVINO ("openvino") or whichever export measured best ("auto")."""
    if backend == "auto":
        backend = "onnx" if int8 else choose_backend(folder)
    if backend == "openvino":
        if int8:
            raise BackendError(
                "the int8 model runs on ONNX Runtime; the OpenVINO backend runs the fp32 export "
                "(in bf16 where the CPU has it): use --backend onnx with --int8"
            )
        return OpenVinoClassifier(folder, batch_size=batch_size, max_pixels=max_pixels)
    return OnnxClassifier(folder, int8=int8, batch_size=batch_size, max_pixels=max_pixels)
