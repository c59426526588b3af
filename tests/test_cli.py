"""The command lines a user meets first: fast to answer --help, and their help texts read cleanly."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from momentkv.cli import COMMANDS, main


def test_top_level_help_imports_neither_torch_nor_transformers():
    """``momentkv --help`` answers without loading the library: the public names load on first use."""
    probe = ("import sys, contextlib, io\nfrom momentkv.cli import main\n"
             "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n    main(['--help'])\n"
             "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"


def test_the_public_names_load_on_first_use():
    import momentkv

    assert set(momentkv.__all__) <= set(dir(momentkv))
    assert all(getattr(momentkv, name) is not None for name in momentkv.__all__)
    with pytest.raises(AttributeError, match="no attribute 'patchh'"):
        momentkv.patchh


@pytest.mark.parametrize("command", [name for name, _, _ in COMMANDS])
def test_each_commands_help_says_each_default_once(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text
    for option in text.split(" --")[1:]:
        assert option.count("default") <= 1, f"a default said twice: --{option[:120]}"


def test_lm_eval_help_names_this_command(capsys):
    pytest.importorskip("lm_eval")
    from momentkv.evals.lm_eval_adapter import main as lm_eval_main

    with pytest.raises(SystemExit):
        lm_eval_main(["run", "--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: momentkv-lm-eval run")
    assert not re.search(r"(?<![\w-])lm-eval ", text), "lm-eval's own command name left in the help"


def test_a_zero_default_is_shown(capsys):
    """0 is a default worth saying (``--seed``), unlike None or a flag's False."""
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "which document and question (default: 0)" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("options, message", [(["--competing", "-1"], "--competing must be at least 0"),
                                              (["--competing", "2", "--kv-caps", "1G"], "--kv-caps runs each")])
def test_bench_refuses_a_load_it_cannot_apply(options, message, capsys):
    with pytest.raises(SystemExit):
        main(["bench", *options])
    assert message in capsys.readouterr().err
