"""The grouped GEMM's launch configs: the TF32 families through the interpreter against the
reference, and the config choice (tuned table, run-time tuning, heuristic) with its rules:
nearest row bucket, the key covering E and the layout, no tuning while a CUDA graph captures."""
import json

import pytest
import torch
from test_grouped_gemm import offsets_of
from tolerance import assert_close

from finteam_kernels import configs, reference

kernels = pytest.importorskip("finteam_kernels.ops.grouped_gemm_kernels")


@pytest.mark.parametrize("family", ["tf32", "tf32_glu"])
def test_tf32_configs_match_reference(monkeypatch, family):
    """Every TF32 config through the launch helpers with TF32 allowed: rows ending inside tiles
    of every height, D and O over several tiles. The interpreter multiplies in fp32, so this
    checks the tiling and masks; the TF32 rounding itself is checked on a GPU (test_cuda_ops)."""
    import finteam_kernels.ops.grouped_gemm as op

    monkeypatch.setattr(op, "_tf32_allowed", lambda: True)
    counts, D, O = [70, 0, 1, 129], 70, 130
    offsets, N = offsets_of(counts), sum(counts)
    glu = family == "tf32_glu"
    x = torch.randn(N, D)
    index = torch.randperm(N).to(torch.int32)
    w = torch.randn(len(counts), 2 * O if glu else O, D)
    x_rows = x[index.long() // 2] if glu else x
    h = reference.grouped_gemm(x_rows, w, offsets)
    y_expected = reference.glu(h, "silu") if glu else h
    dy = torch.randn(N, O)
    dw_expected = torch.stack([dy[a:b].t() @ x_rows[a:b] for a, b in zip(offsets, offsets[1:])])
    seen = []
    real_family = kernels.family
    monkeypatch.setattr(kernels, "family", lambda *a, **k: seen.append(real_family(*a, **k)) or seen[-1])
    for config in kernels.GEMM_CONFIGS[family]:
        monkeypatch.setattr(kernels, "default_gemm_config", lambda *_, c=config: kernels.gemm_meta(c))
        if glu:
            y, _ = op.gemm(x, w, offsets, index_N=index, index_div=2, activation="silu")
        else:
            y, _ = op.gemm(x, w, offsets)
        assert_close(y, y_expected, name=f"{config}: y")
    for config in kernels.WGRAD_CONFIGS["tf32"]:
        monkeypatch.setattr(kernels, "default_wgrad_config", lambda *_, c=config: kernels.wgrad_meta(c))
        dw = op.wgrad(dy, x_rows, offsets)
        assert_close(dw, dw_expected, name=f"{config}: dw")
    assert set(seen) == {family, "tf32"}, seen


def test_fp32_uses_tf32_only_when_pytorch_allows_it(monkeypatch):
    import finteam_kernels.ops.grouped_gemm as op

    assert op._dot_flags(torch.float32)["DOT_PRECISION"] == ("tf32" if op._tf32_allowed() else "ieee")
    monkeypatch.setattr(op, "_tf32_allowed", lambda: True)
    assert op._dot_flags(torch.float32)["DOT_PRECISION"] == "tf32"
    assert op._dot_flags(torch.bfloat16)["DOT_PRECISION"] == "ieee"
    assert kernels.family(4, True, "tf32") == "tf32_glu" and kernels.family(4, False, "ieee") == "fp32"
    assert kernels.family(2, True, "ieee") == "glu"


def test_tf32_configs_are_wgmma_sized():
    """wgmma takes 64 rows at least: every TF32 (and 16-bit) tile is at least that tall."""
    for name in ("plain", "glu", "tf32", "tf32_glu"):
        assert all(c[0] >= 64 for c in kernels.GEMM_CONFIGS[name]), name
    for name in ("plain", "tf32"):
        assert all(c[0] >= 64 for c in kernels.WGRAD_CONFIGS[name]), name


@pytest.fixture
def table_dir(tmp_path, monkeypatch):
    """A tuned table for a GPU called 'Test GPU', read through FINTEAM_CONFIG_DIR."""
    monkeypatch.setenv("FINTEAM_CONFIG_DIR", str(tmp_path))
    monkeypatch.setattr(configs, "device_name", lambda index: "Test GPU")
    configs.table.cache_clear()
    yield tmp_path
    configs.table.cache_clear()


def _write(folder, entries):
    (folder / configs.file_name("Test GPU")).write_text(json.dumps({"device": "Test GPU", **entries}))
    configs.table.cache_clear()


def test_lookup_takes_the_nearest_tuned_row_bucket(table_dir):
    key = configs.problem_key(family="plain", E=8, O=64, D=32)
    _write(table_dir, {"gemm": {key: {"64": [64, 64, 64, 4, 4], "4096": [128, 128, 64, 8, 3]}}})
    cuda0 = torch.device("cuda", 0)
    assert configs.lookup("gemm", cuda0, key, 1) == (64, 64, 64, 4, 4)
    assert configs.lookup("gemm", cuda0, key, 100) == (64, 64, 64, 4, 4)
    assert configs.lookup("gemm", cuda0, key, 3000) == (128, 128, 64, 8, 3)
    assert configs.lookup("gemm", cuda0, key, 10**6) == (128, 128, 64, 8, 3)
    assert configs.lookup("wgrad", cuda0, key, 64) is None  # another kernel
    assert configs.lookup("gemm", cuda0, configs.problem_key(family="plain", E=16, O=64, D=32), 64) is None
    assert configs.lookup("gemm", torch.device("cpu"), key, 64) is None  # tables are per GPU


def test_shipped_tables_are_well_formed():
    """Every shipped table names its device and versions, and each entry is a config of its
    family's list (so the ahead-of-time compile test covers it)."""
    import glob
    import os

    for path in glob.glob(os.path.join(configs.HERE, "*.json")):
        with open(path) as f:
            data = json.load(f)
        assert os.path.basename(path) == configs.file_name(data["device"]), path
        assert {"triton", "torch", "date"} <= set(data), path
        for kind, families in (("gemm", kernels.GEMM_CONFIGS), ("wgrad", kernels.WGRAD_CONFIGS)):
            for key, buckets in data.get(kind, {}).items():
                family = dict(part.split("=") for part in key.split(","))["family"]
                for bucket, config in buckets.items():
                    assert int(bucket) & (int(bucket) - 1) == 0, (path, key, bucket)
                    assert tuple(config) in families[family], (path, key, bucket, config)


def test_problem_key_covers_experts_and_layout():
    x = torch.randn(10, 32)
    w = torch.randn(4, 48, 32)
    flags = {"GATHER": False, "ACTIVATION": "none", "STORE_H": False}
    plain = kernels.gemm_problem("plain", x, w, 10, 48, 32, 4, flags)
    assert plain != kernels.gemm_problem("plain", x, w, 10, 48, 32, 8, flags)  # E
    w_t = torch.randn(4, 32, 48).transpose(1, 2)
    assert plain != kernels.gemm_problem("plain", x, w_t, 10, 48, 32, 4, flags)  # w^T
    assert plain != kernels.gemm_problem("plain", x, w, 10, 48, 32, 4, {**flags, "GATHER": True})
    dy, dw = torch.randn(10, 48), torch.randn(4, 48, 32)
    dw_t = torch.randn(4, 32, 48).transpose(1, 2)
    assert (kernels.wgrad_problem("plain", dy, x, dw, 48, 32, 4, flags)
            != kernels.wgrad_problem("plain", dy, x, dw_t, 48, 32, 4, flags))
    for name in ("rows_bucket", "O", "D", "E", "GATHER"):
        assert name in kernels.GEMM_TUNED["plain"].keys and name in kernels.WGRAD_TUNED["plain"].keys


def test_launch_config_order(table_dir, monkeypatch):
    """The table first; without an entry, tuning (None) when allowed; the heuristic when tuning
    is off or a CUDA graph is being captured."""
    import finteam_kernels.ops._triton as triton_helpers

    cuda0 = torch.device("cuda", 0)
    key = configs.problem_key(family="plain", E=8, O=64, D=32)
    _write(table_dir, {"gemm": {key: {"1024": [64, 64, 64, 4, 4]}}})
    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    monkeypatch.setattr(triton_helpers, "autotune_enabled", lambda: True)
    assert kernels.launch_config("gemm", "plain", key, 1000, 8, cuda0) == kernels.gemm_meta((64, 64, 64, 4, 4))
    other = configs.problem_key(family="plain", E=8, O=64, D=64)
    assert kernels.launch_config("gemm", "plain", other, 1000, 8, cuda0) is None
    capturing[0] = True
    assert kernels.launch_config("gemm", "plain", other, 1000, 8, cuda0) == kernels.default_gemm_config("plain", 1000, 8)
    assert kernels.launch_config("wgrad", "plain", other, 1000, 8, cuda0) == kernels.default_wgrad_config("plain", 1000, 8)
    capturing[0] = False
    monkeypatch.setattr(triton_helpers, "autotune_enabled", lambda: False)
    assert kernels.launch_config("gemm", "plain", other, 1000, 8, cuda0) == kernels.default_gemm_config("plain", 1000, 8)


def test_a_tuned_launch_is_remembered(monkeypatch, caplog):
    """After run-time tuning (on a stand-in benchmark that prefers the last config), later
    launches of the same problem and row bucket, a CUDA-graph capture among them, take the
    tuned config without tuning again. The tuning says that it runs (a warning, the first time
    in a process), so that a slow first step does not look like a hang."""
    import finteam_kernels.ops._triton as triton_helpers
    from finteam_kernels.ops.grouped_gemm import gemm

    monkeypatch.setattr(kernels, "_TUNED_HERE", {})
    monkeypatch.setattr(triton_helpers, "autotune_enabled", lambda: True)
    runs = []
    tuned = kernels.GEMM_TUNED["plain"]

    def bench(kernel_call, quantiles):
        runs.append(1)
        kernel_call()
        return [float(10 - len(runs))] * 3

    monkeypatch.setitem(tuned.__dict__, "do_bench", bench)
    counts, D, O = [5, 0, 12], 20, 9
    x, w = torch.randn(sum(counts), D, dtype=torch.bfloat16), torch.randn(len(counts), O, D, dtype=torch.bfloat16)
    offsets = offsets_of(counts)
    with caplog.at_level("INFO", logger="finteam_kernels"):
        y, _ = gemm(x, w, offsets)
    assert len(runs) == len(kernels.GEMM_CONFIGS["plain"])
    (record,) = [r for r in caplog.records if "tuning the grouped GEMM" in r.getMessage()]
    assert record.levelname == "WARNING" and "FINTEAM_AUTOTUNE=0" in record.getMessage()
    ((key, meta),) = kernels._TUNED_HERE.items()
    assert meta == kernels.gemm_meta(kernels.GEMM_CONFIGS["plain"][-1])
    assert kernels.launch_config("gemm", *key[1:3], 17, 3, torch.device("cpu")) == meta  # same bucket
    caplog.clear()
    with caplog.at_level("INFO", logger="finteam_kernels"):
        y_again, _ = gemm(x, w, offsets)
    assert len(runs) == len(kernels.GEMM_CONFIGS["plain"]) and torch.equal(y, y_again)
    assert not caplog.records, "a remembered config must not be tuned (or announced) again"
