from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import megacontext as mc
from megacontext import native


def test_extension_imports_and_reports_its_build():
    import megacontext._C as C

    info = C.build_info()
    assert info["abi_version"] == C.ABI_VERSION >= 1
    assert isinstance(info["cuda_compiled"], bool)
    # nvcc is on every development and CI machine, so CUDA sources are compiled in
    assert info["cuda_compiled"] is True and info["cuda_version"]
    assert native.build_info()["available"] is True


def test_cuda_device_count_agrees_with_torch():
    import megacontext._C as C

    assert C.cuda_device_count() == torch.cuda.device_count()
    assert native.cuda_available() == torch.cuda.is_available()


def test_forced_backend(monkeypatch):
    monkeypatch.delenv("MEGACONTEXT_BACKEND", raising=False)
    assert native.forced_backend() is None
    monkeypatch.setenv("MEGACONTEXT_BACKEND", "CPP")
    assert native.forced_backend() == "cpp"
    monkeypatch.setenv("MEGACONTEXT_BACKEND", "auto")
    assert native.forced_backend() is None
    monkeypatch.setenv("MEGACONTEXT_BACKEND", "gpu")
    with pytest.raises(mc.ConfigError, match="MEGACONTEXT_BACKEND"):
        native.forced_backend()


def test_import_is_light():
    """Importing megacontext loads neither torch nor transformers nor the extension."""
    code = (
        "import sys, megacontext as mc; "
        "heavy = [m for m in ('torch', 'transformers', 'triton', 'megacontext._C') "
        "if m in sys.modules]; print(heavy); assert not heavy, heavy; "
        "assert mc.ConfigError and mc.MegaContextConfig"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_lazy_names_resolve():
    for name in mc.__all__:
        assert getattr(mc, name) is not None, name
    with pytest.raises(AttributeError, match="no_such_thing"):
        mc.no_such_thing  # noqa: B018
