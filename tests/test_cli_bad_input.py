"""Bad input through the CLI and the Python API: one line on stderr naming what is wrong and what to do,
exit 1, no traceback, and no file touched outside the output directory (the working directory, the model's
directory and the output directory are hashed before and after each run)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from graphpress.cli import main
from tests.hf_tiny import save_tiny

MODELS = '''
import torch

class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))

class Branchy(MLP):
    def forward(self, x):
        y = self.fc1(x)
        if y.sum() > 0:
            return y
        return -y

def good():
    torch.manual_seed(0)
    return MLP(), (torch.randn(2, 8),)

def wrong_shape():
    return MLP(), (torch.randn(2, 7),)

def returns_module():
    return MLP()

def returns_garbage():
    return MLP(), 42

def raises():
    return undefined_name

def branchy():
    return Branchy(), (torch.randn(2, 8),)
'''


def _snapshot(root: Path) -> dict[str, str]:
    """Every file and directory under ``root`` (names, modes and contents)."""
    snap = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_dir():
            snap[rel] = f"dir {p.stat().st_mode:o}"
        else:
            snap[rel] = f"{p.stat().st_mode:o} {hashlib.sha256(p.read_bytes()).hexdigest()}"
    return snap


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama saved without a tokenizer (what ``model.save_pretrained`` alone gives)."""
    return save_tiny("llama", tmp_path_factory.mktemp("hf") / "tiny-llama")


@pytest.fixture(scope="module")
def hf_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT saved without a tokenizer."""
    return save_tiny("bert", tmp_path_factory.mktemp("hf") / "tiny-bert")


@pytest.fixture(scope="module")
def hf_broken_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama whose tokenizer file cannot be read (found only once the model loads)."""
    path = save_tiny("llama", tmp_path_factory.mktemp("hf") / "broken-llama")
    (path / "tokenizer.json").write_text("{not json")
    return path


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The user's working directory: their model file, recipes and notes."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "models.py").write_text(MODELS)
    (work / "notes.txt").write_text("the user's own file")
    recipes = {
        "bits.yaml": "passes:\n  - pass: rtn\n    bits: '4'\n",
        "bits3.yaml": "passes:\n  - pass: rtn\n    bits: 3\n",
        "calib.yaml": "passes:\n  - pass: remove_noops\ncalibration: {windows: 4, lenght: 64}\n",
        "target.yaml": "passes:\n  - pass: remove_noops\ntarget: {onnxruntime: {acuracy_level: 4}}\n",
        "unknown.yaml": "passes:\n  - pass: make_it_faster\n",
        "broken.yaml": "passes: [\n  - pass: remove_noops\n  unclosed",
        "greedy.yaml": "passes:\n  - pass: gptq\n    bits: 4\ncalibration: {windows: 100000, length: 512}\n",
        "gptq.yaml": "passes:\n  - pass: gptq\n    bits: 4\ncalibration: {windows: 2, length: 32}\n",
        "smooth.yaml": "passes:\n  - pass: smoothquant\ncalibration: {sentences: 4}\n",
        "train.yaml": "passes:\n  - pass: distill\n    tokens: 10000000000000\n    device: cpu\n"
                      "training: {windows: 8, length: 32}\n",
        "train_small.yaml": "passes:\n  - pass: distill\n    tokens: 64\n    device: cpu\ntraining: {windows: 8, length: 32}\n",
        "untrained.yaml": "passes:\n  - pass: distill\n",
        "ids.txt": "1 2 3 4\n5 6 7 8\n",
        "ids_out_of_range.txt": "1 2 3\n\n4 320 5\n",  # the tiny models have 320 token ids
        "text.txt": "12 13\nSome calibration text.\n",
        "empty.txt": "\n  \n",
    }
    for name, text in recipes.items():
        (work / name).write_text(text)
    (work / "occupied").mkdir()
    (work / "occupied" / "keep.txt").write_text("user data")
    monkeypatch.chdir(work)
    return work


# name -> (argv, text or texts the error line must hold); "HF", "HFE", "HFB" stand for the tiny Hugging Face
# directories: a Llama and a BERT without a tokenizer, a Llama with a broken one
CASES: dict[str, tuple[list[str], str | tuple[str, ...]]] = {
    "out is the working directory": (["compress", "models.py:good", "--out", "."], "working directory"),
    "out is the working directory, forced": (["compress", "models.py:good", "--out", ".", "--force"],
                                             "working directory"),
    "out is a parent": (["compress", "models.py:good", "--out", ".."], "one of its parents"),
    "out is a parent, forced": (["compress", "models.py:good", "--out", "..", "--force"], "one of its parents"),
    "out is the model directory": (["compress", "HF", "--out", "HF"], "model's own files"),
    "out is the model directory, forced": (["compress", "HF", "--out", "HF", "--force"], "model's own files"),
    "out holds user files": (["compress", "models.py:good", "--out", "occupied"], "did not write"),
    "out holds user files, forced": (["compress", "models.py:good", "--out", "occupied", "--force"],
                                     "did not write"),
    "unknown model": (["compress", "no-such-model", "--out", "out"], "unknown model 'no-such-model'"),
    "missing model file": (["compress", "nope.py:build", "--out", "out"], "nope.py does not exist"),
    "missing factory": (["compress", "models.py:nope", "--out", "out"], "has no function 'nope'"),
    "factory returns a module": (["compress", "models.py:returns_module", "--out", "out"],
                                 "must return (module, example_inputs)"),
    "factory returns garbage inputs": (["compress", "models.py:returns_garbage", "--out", "out"],
                                       "example inputs that are a int"),
    "factory raises": (["compress", "models.py:raises", "--out", "out"], "NameError at models.py:"),
    "wrong input shape": (["compress", "models.py:wrong_shape", "--out", "out"], "mat1 and mat2"),
    "uncapturable model": (["compress", "models.py:branchy", "--out", "out"], "models.py:16"),
    "missing recipe": (["compress", "models.py:good", "--recipe", "nope.yaml", "--out", "out"], "not found"),
    "unreadable recipe": (["compress", "models.py:good", "--recipe", "broken.yaml", "--out", "out"],
                          "cannot read recipe"),
    "unknown pass": (["compress", "models.py:good", "--recipe", "unknown.yaml", "--out", "out"],
                     "unknown pass 'make_it_faster'"),
    "bad pass option": (["compress", "models.py:good", "--recipe", "bits3.yaml", "--out", "out"],
                        "bits=3 is not supported"),
    "option of the wrong type": (["compress", "models.py:good", "--recipe", "bits.yaml", "--out", "out"],
                                 "bits.yaml: pass rtn: option 'bits' must be an integer, not '4'"),
    "unknown calibration key": (["compress", "models.py:good", "--recipe", "calib.yaml", "--out", "out"],
                                "calib.yaml: unknown key 'lenght' under 'calibration'"),
    "unknown target option in the recipe": (["compress", "models.py:good", "--recipe", "target.yaml", "--out", "out"],
                                            "target.yaml: target onnxruntime has no option 'acuracy_level'"),
    "unknown target": (["compress", "models.py:good", "--target", "tensorrt", "--out", "out"],
                       "unknown target 'tensorrt' (known: onnx-qdq, onnxruntime)"),
    "an option the qdq target does not have": (
        ["compress", "models.py:good", "--target", "onnx-qdq", "--target-option", "kernel=int8", "--out", "out"],
        "target onnx-qdq has no option 'kernel' (options: opset)"),
    "unknown target option": (["compress", "models.py:good", "--target-option", "kernal=int8", "--out", "out"],
                              "target onnxruntime has no option 'kernal' (options: kernel, accuracy_level"),
    "bad target option value": (["compress", "models.py:good", "--target-option", "kernel=int4", "--out", "out"],
                                "kernel must be one of nbits, int8, not 'int4'"),
    "target option without a value": (["compress", "models.py:good", "--target-option", "int8", "--out", "out"],
                                      "target option 'int8' must look like key=value"),
    "calibration longer than the text": (["compress", "tiny-llama", "--recipe", "greedy.yaml", "--out", "out"],
                                         "asked for 100000 calibration windows"),
    "calibration without a tokenizer": (["compress", "HF", "--recipe", "gptq.yaml", "--out", "out"],
                                        ("recipe gptq: pass gptq needs calibration text, but HF has no tokenizer",
                                         "pass --calibration FILE (token ids, one window per line")),
    "calibration without a tokenizer, encoder": (["compress", "HFE", "--recipe", "smooth.yaml", "--out", "out"],
                                                 ("recipe smooth: pass smoothquant needs calibration text, but HFE "
                                                  "has no tokenizer", "(token ids, one sentence per line")),
    "calibration with a broken tokenizer": (["compress", "HFB", "--recipe", "gptq.yaml", "--out", "out"],
                                            ("recipe gptq: pass gptq needs calibration text, but the tokenizer in "
                                             "HFB cannot be loaded", "pass --calibration FILE")),
    "calibration file missing": (["compress", "HF", "--recipe", "gptq.yaml", "--out", "out", "--calibration",
                                  "nope.txt"], "calibration file nope.txt does not exist"),
    "calibration file empty": (["compress", "HF", "--recipe", "gptq.yaml", "--out", "out", "--calibration",
                                "empty.txt"], "empty.txt is empty: give token ids, one window per line"),
    "calibration ids out of range": (["compress", "HF", "--recipe", "gptq.yaml", "--out", "out", "--calibration",
                                      "ids_out_of_range.txt"],
                                     "ids_out_of_range.txt line 3: token id 320 is outside the vocabulary of model "
                                     "tiny-llama (ids 0..319)"),
    "calibration text without a tokenizer": (["compress", "HF", "--recipe", "gptq.yaml", "--out", "out",
                                              "--calibration", "text.txt"],
                                             ("text.txt is text (line 2 ('Some calibration text.') is not "
                                              "whitespace-separated integers), but HF has no tokenizer",
                                              "give token ids, one window per line")),
    "calibration ids for a plain module": (["compress", "models.py:good", "--recipe", "gptq.yaml", "--out", "out",
                                            "--calibration", "ids.txt"], "--calibration is for language models"),
    "calibration on a plain module": (["compress", "models.py:good", "--recipe", "gptq.yaml", "--out", "out"],
                                      "needs calibration data"),
    "training for hours on a CPU": (["compress", "tiny-llama", "--recipe", "train.yaml", "--out", "out"],
                                    ("distill: no GPU here, and 10,000,000,000,000 training tokens on a model of",
                                     "run this recipe where a CUDA GPU is, or lower distill's tokens")),
    "training without training text": (["compress", "tiny-llama", "--recipe", "untrained.yaml", "--out", "out"],
                                       "untrained.yaml: a pass trains (distill), so the recipe needs a 'training' "
                                       "section"),
    "training an encoder": (["compress", "HFE", "--recipe", "train_small.yaml", "--out", "out"],
                            "recipe train_small trains (distill), which needs a causal language model"),
    "missing onnx file": (["eval", "missing.onnx"], "does not exist"),
    "eval without a tokenizer": (["eval", "HF"], "has no tokenizer"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_line_and_touches_nothing(case: str, work: Path, hf_dir: Path, hf_encoder_dir: Path,
                                                      hf_broken_tokenizer_dir: Path,
                                                      capfd: pytest.CaptureFixture[str]) -> None:
    argv, expected = CASES[case]
    dirs = {"HFE": hf_encoder_dir, "HFB": hf_broken_tokenizer_dir, "HF": hf_dir}  # longest name first

    def fill(text: str) -> str:
        for name, path in dirs.items():
            text = text.replace(name, str(path))
        return text

    argv = [str(dirs[a]) if a in dirs else a for a in argv]
    texts = [fill(t) for t in ((expected,) if isinstance(expected, str) else expected)]
    models = [argv_dir for argv_dir in dirs.values() if str(argv_dir) in argv]
    before = (_snapshot(work), [_snapshot(m) for m in models], _snapshot(work.parent))
    capfd.readouterr()
    assert main(argv) == 1
    captured = capfd.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphpress: error: "), captured.err
    for text in texts:
        assert text in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert (_snapshot(work), [_snapshot(m) for m in models], _snapshot(work.parent)) == before


def test_verbose_shows_the_traceback(work: Path, capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["-v", "compress", "models.py:wrong_shape", "--out", "out"]) == 1
    assert "Traceback" in capfd.readouterr().err


def test_pass_class_instead_of_instance_is_named() -> None:
    from graphpress.capture import capture
    from graphpress.passes import PASSES
    from graphpress.runner import PipelineError, run_pipeline

    program = capture(torch.nn.Linear(4, 2), (torch.randn(2, 4),), name="lin")
    with pytest.raises(PipelineError, match=r"the class RemoveNoops is not a pass instance: write RemoveNoops\(\)"):
        run_pipeline(program, [PASSES["remove_noops"]])  # type: ignore[list-item]


def _run_until(argv: list[str], cwd: Path, ready: Callable[[], bool], sig: int) -> subprocess.CompletedProcess[str]:
    """Start the CLI, send ``sig`` once ``ready()`` holds, and wait for it to end."""
    # a shell's background job ignores SIGINT and its children inherit that (Python then installs no
    # KeyboardInterrupt handler): the child gets the default disposition whatever ran pytest
    proc = subprocess.Popen([sys.executable, "-m", "graphpress.cli", *argv], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before it could be interrupted: {proc.communicate()}"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _staging(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if ".graphpress-" in p.name]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_compress_leaves_nothing(sig: int, tmp_path: Path) -> None:
    before = _snapshot(tmp_path)
    done = _run_until(["compress", "tiny-llama", "--out", "out"], tmp_path, lambda: bool(_staging(tmp_path)), sig)
    # 130 / 143 from graphpress; a SIGINT that lands again while Python exits ends it by the signal itself (-2)
    assert done.returncode in ((130, -signal.SIGINT) if sig == signal.SIGINT else (143,)), done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("graphpress: interrupted"), done.stderr
    assert _snapshot(tmp_path) == before  # no staging directory, no output


def test_a_killed_run_is_cleaned_up_by_the_next(tmp_path: Path) -> None:
    _run_until(["compress", "tiny-llama", "--out", "out"], tmp_path, lambda: bool(_staging(tmp_path)),
               signal.SIGKILL)
    assert _staging(tmp_path) and not (tmp_path / "out").exists()  # killed outright: it could not clean up
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert main(["compress", "tiny-llama", "--out", "out", "--no-eval"]) == 0
    finally:
        os.chdir(cwd)
    assert not _staging(tmp_path) and (tmp_path / "out" / "model.onnx").is_file()
