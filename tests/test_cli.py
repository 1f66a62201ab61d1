import subprocess
import sys

import pytest

from sparseblocks.cli import main


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "ops run" in out


def test_demo_checks_sparse_model_against_masked_dense(capsys):
    assert main(["demo", "--sparsity", "0.8", "--block", "64"]) == 0
    out = capsys.readouterr().out
    assert "[OK]" in out and "12 linears" in out


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "sparseblocks.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "demo" in result.stdout


def test_bad_arguments_exit_with_usage():
    with pytest.raises(SystemExit):
        main(["demo", "--block", "24"])
