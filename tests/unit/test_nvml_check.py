"""The per-step NVML probe is dropped only where NVML cannot be loaded."""

from __future__ import annotations

import ctypes
import os

import pytest

from prunelab import train


def _unloadable(name: str) -> None:
    raise OSError(f"{name}: cannot open shared object file")


def test_cleared_where_nvml_cannot_be_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    monkeypatch.setattr(ctypes, "CDLL", _unloadable)
    train._skip_unloadable_nvml()

    assert os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] == "0"


def test_kept_where_nvml_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    monkeypatch.setattr(ctypes, "CDLL", lambda name: object())
    train._skip_unloadable_nvml()

    assert os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] == "1"


def test_left_alone_when_not_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTORCH_NVML_BASED_CUDA_CHECK", raising=False)
    monkeypatch.setattr(ctypes, "CDLL", _unloadable)
    train._skip_unloadable_nvml()

    assert "PYTORCH_NVML_BASED_CUDA_CHECK" not in os.environ
