"""bench/compile_report.py compiles the kernels to cubin for sm_90 and sm_80 without a GPU
(--quick: first config and variant of every kernel, bf16).  Runs in a subprocess with the
interpreter off: conftest turns it on for this process."""
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
    for name in ("scores", "select", "route", "expert_fwd", "expert_pool", "expert_pool_det", "dpre", "dx", "dw", "gate_bwd",
                 "route_dense_dr", "route_dense_dx"):
        assert f"\n{name} " in out, name
    assert "mma" in out  # tensor-core instructions in the GEMM kernels
