"""bench/compile_report.py compiles the kernels to cubin for sm_90 and sm_80 without a GPU
(--quick: every launch of the benchmark shapes, bf16; the full report, every problem of
kernels/registry.py in every dtype, is CI's).  Runs in a subprocess with the interpreter off:
conftest turns it on for this process."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("arch", [90, 80])
def test_compile_report_quick(arch):
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "compile_report.py"), "--arch", str(arch), "--quick"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert f"sm_{arch}:" in out and "0 failed" in out
    for name in ("forward", "rows_bwd", "dx_dw"):  # the launches of the benchmark shapes
        assert f"\n{name} " in out, name
    assert "wgmma" in out if arch == 90 else "mma" in out  # tensor-core instructions in the GEMM kernels
