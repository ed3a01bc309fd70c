"""BAD_INPUTS case 23 outside a training: a batch that does not fit in memory while evaluating,
predicting or embedding ends in one line that says which batch size to try, on PyTorch and on
ONNX Runtime (the allocators' own messages, injected where the batch runs)."""

from __future__ import annotations

import re

import pytest

from imgclf import api
from imgclf.cli import main as cli_main
from imgclf.core.errors import MemoryLimitError, batch_memory
from imgclf.predictors import pytorch

TORCH_CPU = (
    "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
    "you tried to allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)"
)
ORT_ARENA = (
    "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running Conv node. "
    "Name:'/conv/Conv' Status Message: Failed to allocate memory for requested buffer of size 411041792"
)


def _fails(message: str, kind=RuntimeError):
    def fail(*args, **kwargs):
        raise kind(message)

    return fail


def _advice(message: str) -> None:
    found = re.search(r"on a batch of (\d+) images \((.+)\); try --predict-batch-size (\d+)", message)
    assert found, message
    assert int(found[3]) == max(1, int(found[1]) // 2)


def test_evaluate_out_of_memory_names_the_batch_size_to_try(digits_run, tmp_path, monkeypatch):
    monkeypatch.setattr(pytorch, "model_input", _fails(TORCH_CPU))
    with pytest.raises(MemoryLimitError) as raised:
        api.evaluate(digits_run, tmp_path / "eval")
    _advice(str(raised.value))
    assert "can't allocate memory" in str(raised.value)


def test_predict_on_the_command_line_is_one_line_and_exit_2(digits_run, digits_dir, monkeypatch, capsys):
    monkeypatch.setattr(pytorch, "model_input", _fails(TORCH_CPU))
    photos = [str(p) for p in sorted((digits_dir / "3").glob("*.png"))[:5]]
    code = cli_main(["predict", str(digits_run), *photos, "--predict-batch-size", "4", "--backend", "torch"])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("backend:")]
    assert code == 2 and len(err) == 1, err  # one line, no traceback
    assert err[0].startswith("imgclf: error: out of memory") and "on a batch of 4 images" in err[0]
    assert "--predict-batch-size 2" in err[0]


def test_embed_out_of_memory_says_so(digits_run, tmp_path, monkeypatch):
    from imgclf.evaluation import embed

    monkeypatch.setattr(embed, "pooled_features", _fails("CUDA out of memory. Tried to allocate 2.00 GiB"))
    with pytest.raises(MemoryLimitError) as raised:
        api.embed(digits_run, tmp_path / "embed")
    assert "embedding on a batch of" in str(raised.value)


def test_onnx_runtime_arena_failure_is_the_same_message(digits_run, digits_dir, tmp_path):
    from onnxruntime.capi.onnxruntime_pybind11_state import RuntimeException

    api.export(digits_run, tmp_path / "onnx")
    predictor = api.load(tmp_path / "onnx", backend="onnx")
    predictor.session = type("FullArena", (), {"run": staticmethod(_fails(ORT_ARENA, RuntimeException))})()
    with pytest.raises(MemoryLimitError) as raised:
        predictor.predict(sorted((digits_dir / "3").glob("*.png"))[:3])
    _advice(str(raised.value))
    assert "Failed to allocate memory" in str(raised.value)


def test_other_errors_pass_through_unchanged():
    with pytest.raises(ValueError, match="not about memory"), batch_memory(8):
        raise ValueError("not about memory")
