import subprocess
import sys

import pytest

from pipelines import cli


def test_help_lists_every_step(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ["synth", "serve", "download", "demo", "capfilt", "train", "eval", "index"]:
        assert command in out


def test_eval_with_a_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    code = cli.main(["eval", "retrieval", "--checkpoint", str(tmp_path / "nope"), "--shards", str(tmp_path),
                     "--output", str(tmp_path / "eval")])
    assert code == 2
    assert "nope" in capsys.readouterr().err and not (tmp_path / "eval" / "report.json").exists()


def test_unknown_command_is_an_error():
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["frobnicate"])
    assert exit_info.value.code == 2


def test_console_script_runs_a_step(tmp_path):
    blip2 = [sys.executable, "-c", "import sys; from pipelines.cli import main; sys.exit(main())"]
    done = subprocess.run([*blip2, "synth", str(tmp_path), "--split", "test", "--images", "2", "--no-progress"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "test.parquet").exists() and "test.parquet" in done.stdout
