"""The recurrent matmuls: the native packed kernel and oneDNN against torch.mm, and how one is chosen."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mlstm_trainer import recurrent_matmul
from mlstm_trainer.config import ConfigError
from mlstm_trainer.recurrent_matmul import MATMUL_ENV, RecurrentMatmul, matmul_choice, native_available

needs_native = pytest.mark.skipif(not native_available(), reason="native kernel not built or no AVX2/FMA")
LONG_LOOP = recurrent_matmul.MIN_STEPS_TO_PACK


@pytest.fixture
def every_call_threaded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Split even tiny matmuls across threads, so small shapes exercise the worker pool."""
    monkeypatch.setattr(recurrent_matmul, "_MACS_PER_THREAD", 1)


# Shapes hit every micro-kernel: rows 1-4 (and remainders), strip widths 8, 16 and 24, and depths
# shorter than, equal to and longer than one 256-row panel.
SHAPES = [(1, 1, 8), (3, 5, 16), (5, 17, 24), (7, 300, 40), (9, 257, 56), (4, 513, 32), (32, 256, 1024)]


@needs_native
@pytest.mark.usefixtures("every_call_threaded")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("rows", "depth", "width"), SHAPES)
def test_native_matches_torch(rows: int, depth: int, width: int, threads: int) -> None:
    gen = torch.Generator().manual_seed(rows * 1000 + depth)
    weight = torch.randn(width, depth, generator=gen)
    x = torch.randn(rows, depth, generator=gen)
    other = torch.randn(rows, width, generator=gen)
    matmul = RecurrentMatmul(weight, rows, LONG_LOOP, threads=threads)
    assert matmul.kind == "native"
    torch.testing.assert_close(matmul(x), x @ weight.T, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(matmul.plus(x, other), other + x @ weight.T, rtol=1e-5, atol=1e-4)


@needs_native
@pytest.mark.usefixtures("every_call_threaded")
def test_native_takes_strided_weights_inputs_and_outputs() -> None:
    """The loops pass ``w.t()`` views and per-step slices of bigger buffers; no copies are needed."""
    gen = torch.Generator().manual_seed(1)
    weight_t = torch.randn(40, 24, generator=gen).t()  # [24, 40] view with strides (1, 24)
    wide = torch.randn(6, 40, generator=gen)
    x = wide[::2]  # rows 0, 2, 4: row stride 80
    big = torch.full((3, 48), float("nan"))
    out = big[:, 8:32]  # row stride 48
    matmul = RecurrentMatmul(weight_t, 3, LONG_LOOP, threads=2)
    result = matmul(x, out=out)
    assert result.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, x @ weight_t.T, rtol=1e-5, atol=1e-4)
    assert big[:, :8].isnan().all() and big[:, 32:].isnan().all(), "wrote outside its output slice"
    other = torch.randn(3, 48, generator=gen)[:, 24:]
    torch.testing.assert_close(matmul.plus(x, other), other + x @ weight_t.T, rtol=1e-5, atol=1e-4)


@needs_native
def test_native_rejects_tensors_it_cannot_read() -> None:
    matmul = RecurrentMatmul(torch.randn(16, 8), 2, LONG_LOOP)
    with pytest.raises(ValueError, match=r"x must be a \[2, 8\] float32 CPU tensor"):
        matmul(torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="unit column stride"):
        matmul(torch.randn(8, 2).t())
    with pytest.raises(ValueError, match=r"out must be a \[2, 16\]"):
        matmul(torch.randn(2, 8), out=torch.empty(2, 8))


@needs_native
@pytest.mark.usefixtures("every_call_threaded")
def test_pool_survives_many_calls_and_fork() -> None:
    """Thousands of back-to-back pooled calls stay exact, and a forked child gets a working pool."""
    gen = torch.Generator().manual_seed(2)
    weight, x = torch.randn(64, 32, generator=gen), torch.randn(6, 32, generator=gen)
    expected = x @ weight.T
    matmul = RecurrentMatmul(weight, 6, LONG_LOOP, threads=2)
    for _ in range(3000):
        result = matmul(x)
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-4)
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        code = 0 if torch.allclose(matmul(x), expected, rtol=1e-5, atol=1e-4) else 1
        os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_short_loops_and_other_devices_use_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MATMUL_ENV, raising=False)
    assert RecurrentMatmul(torch.randn(16, 8), 2, LONG_LOOP - 1).kind == "torch"
    assert RecurrentMatmul(torch.randn(16, 8, dtype=torch.float64), 2, LONG_LOOP).kind == "torch"
    monkeypatch.setenv(MATMUL_ENV, "torch")
    assert RecurrentMatmul(torch.randn(16, 8), 2, LONG_LOOP).kind == "torch"


@needs_native
def test_auto_prefers_native_and_falls_back_for_odd_widths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MATMUL_ENV, raising=False)
    assert RecurrentMatmul(torch.randn(16, 8), 2, LONG_LOOP).kind == "native"
    assert RecurrentMatmul(torch.randn(12, 8), 2, LONG_LOOP).kind == "torch"  # 12 % 8 != 0, small


@pytest.mark.parametrize(
    ("value", "weight", "message"),
    [
        ("fast", torch.randn(16, 8), "MLSTM_RECURRENT_MATMUL='fast' is not one of auto, native, onednn, torch"),
        ("native", torch.randn(12, 8), "widths divisible by 8"),
        ("native", torch.randn(16, 8, dtype=torch.float64), "float32 on CPU"),
        ("onednn", torch.randn(16, 8, dtype=torch.float64), "needs a float32 CPU weight"),
    ],
)
def test_bad_choices_are_config_errors(
    monkeypatch: pytest.MonkeyPatch, value: str, weight: torch.Tensor, message: str
) -> None:
    monkeypatch.setenv(MATMUL_ENV, value)
    if value == "native" and not native_available():
        message = "not built or this CPU lacks AVX2/FMA"
    with pytest.raises(ConfigError, match=message):
        RecurrentMatmul(weight, 2, LONG_LOOP)


def test_trainer_rejects_a_bad_choice_in_one_line_before_writing(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlstm_trainer.__main__ import main

    monkeypatch.setenv(MATMUL_ENV, "fastest")
    run_dir = tmp_path / "run"
    assert main(["--checkpoint-dir", str(run_dir), "--metrics-port", "0"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "mlstm train: error: MLSTM_RECURRENT_MATMUL='fastest' is not one of auto, native, onednn, torch"
    ]
    assert not run_dir.exists()


def test_matmul_choice_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MATMUL_ENV, " Native ")
    assert matmul_choice() == "native"
    monkeypatch.setenv(MATMUL_ENV, "")
    assert matmul_choice() == "auto"


@needs_native
def test_pool_is_not_left_spinning_against_a_busy_caller() -> None:
    """Asking for more threads than CPUs is capped (spinning workers would be time-sliced)."""
    matmul = RecurrentMatmul(torch.randn(16, 8), 2, LONG_LOOP, threads=10_000)
    assert matmul.threads <= len(os.sched_getaffinity(0))


def test_pack_layout_is_strips_of_weight_transposed() -> None:
    """The packed buffer's documented layout: strips of 24 columns of ``weight.T``, row after row."""
    if not native_available():
        pytest.skip("native kernel not built")
    weight = torch.arange(40 * 3, dtype=torch.float32).reshape(40, 3)  # N=40, K=3
    packed = recurrent_matmul.pack_weight(weight)
    b = weight.T  # [3, 40]
    first = b[:, :24].reshape(-1)  # strip 0: 3 rows of 24
    second = b[:, 24:].reshape(-1)  # strip 1 (last, 16 wide): 3 rows of 16
    torch.testing.assert_close(packed, torch.cat([first, second]), rtol=0, atol=0)


SCRIPT_WITHOUT_EXTENSION = textwrap.dedent(
    """
    import sys, torch
    sys.modules["mlstm_trainer._packedgemm"] = None  # as if built without a C compiler
    from mlstm_trainer.recurrent_matmul import RecurrentMatmul, native_available
    assert not native_available()
    m = RecurrentMatmul(torch.randn(4096, 1024), 32, 64)
    print(m.kind)
    """
)


def test_without_the_extension_loops_use_onednn_or_torch() -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT_WITHOUT_EXTENSION], capture_output=True, text=True,
                          timeout=120, check=True)  # fmt: skip
    expected = "onednn" if torch.backends.mkldnn.is_available() else "torch"
    assert proc.stdout.strip() == expected


def test_trainer_names_its_kernels_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    from mlstm_trainer.config import TrainConfig
    from mlstm_trainer.trainer import describe_compute

    monkeypatch.delenv(MATMUL_ENV, raising=False)
    monkeypatch.delenv("MLSTM_CELL", raising=False)
    line = describe_compute(TrainConfig(), torch.device("cpu"))
    expected = "native" if native_available() else ("onednn" if torch.backends.mkldnn.is_available() else "torch")
    threads = torch.get_num_threads()
    assert line.startswith(f"compute: cpu, {threads} thread{'s' if threads > 1 else ''}, fp32; mLSTM cell ")
    assert line.endswith(f"recurrent matmuls {expected}")
    monkeypatch.setenv(MATMUL_ENV, "torch")
    assert describe_compute(TrainConfig(), torch.device("cpu")).endswith("recurrent matmuls torch")


def test_a_forced_choice_that_cannot_run_stops_the_trainer_before_step_one(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlstm_trainer.__main__ import main

    monkeypatch.setenv(MATMUL_ENV, "onednn")
    log = tmp_path / "log.jsonl"
    args = ["--checkpoint-dir", str(tmp_path / "run"), "--metrics-port", "0", "--precision", "bf16",
            "--steps", "2", "--log-jsonl", str(log)]  # fmt: skip
    assert main(args) == 2
    assert capsys.readouterr().err.splitlines() == [
        "mlstm train: error: MLSTM_RECURRENT_MATMUL=onednn needs a float32 CPU weight and torch built with "
        "oneDNN, not a torch.bfloat16 weight on cpu; unset it"
    ]
    assert not log.exists() or log.read_text() == ""


def test_trainer_prints_the_compute_line_after_its_first_step(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlstm_trainer.__main__ import main

    monkeypatch.setenv(MATMUL_ENV, "torch")
    args = ["--checkpoint-dir", str(tmp_path / "run"), "--metrics-port", "0", "--steps", "1",
            "--hidden-size", "16", "--eval-every", "0", "--sample-chars", "0"]  # fmt: skip
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "mLSTM cell" in err and err.count("recurrent matmuls torch") == 1, err
