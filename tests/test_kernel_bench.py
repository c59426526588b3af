"""The kernel benchmark script runs end to end (on CPU here, at a tiny size) and checks what it times."""

from __future__ import annotations

import json

from momentkv.cli import main


def test_kernel_bench_writes_a_checked_table(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench-kernels", "--keys", "96", "--batches", "1", "--device", "cpu", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    row = result["rows"][0]
    assert row["keys"] == 96 and row["rel_error"] < 1e-2
    assert row["momentkv_us"] > 0 and row["evict_us"] > 0 and row["sdpa_math_us"] > 0
    assert result["versions"]["torch"] and "batch" in capsys.readouterr().out
