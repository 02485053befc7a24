import pytest

from configurator import check_ranges, configure, redact_url


def defaults():
    return dict(lr=1e-6, steps=160, name="run", flag=False, url=None, betas=(0.9, 0.99), extra={})


def test_file_then_flags(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("import math\n# overrides only\nsteps = 4\nlr = 3e-6  # comment\n_helper = 1\n")
    g = defaults()
    c = configure(g, [str(cfg), "--steps=8", "--lr=1", "--name=out/a=b", "--url=http://x:1/v1", "--flag=True"])
    assert c["steps"] == 8 and g["steps"] == 8, "a flag overrides the file"
    assert c["lr"] == 1.0 and isinstance(c["lr"], float), "an int may stand for a float"
    assert c["name"] == "out/a=b", "values may contain '=' and stay strings"
    assert c["url"] == "http://x:1/v1" and c["flag"] is True, "None accepts anything; bools parse"
    assert "_helper" not in c and "math" not in c, "private names and imports are not settings"


def test_string_default_keeps_digits():
    assert configure(defaults(), ["--name=42"])["name"] == "42", "a str setting stays a str"


@pytest.mark.parametrize("argv, message", [
    (["--stepz=3"], "unknown key 'stepz' (did you mean steps"),
    (["--steps=1.5"], "steps must be int"),
    (["--flag=1"], "flag must be bool"),
    (["--lr"], "must look like --key=value"),
    (["missing_config.py"], "cannot read config file missing_config.py"),
])
def test_bad_input_exits_with_a_clear_message(argv, message):
    with pytest.raises(SystemExit) as e:
        configure(defaults(), argv)
    assert message in str(e.value), f"expected '{message}' in '{e.value}'"


def test_unknown_key_in_file_names_the_line(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("steps = 4\n\nlearning_rate = 1e-5\n")
    with pytest.raises(SystemExit) as e:
        configure(defaults(), [str(cfg)])
    assert f"{cfg}:3: unknown key 'learning_rate'" in str(e.value), str(e.value)


@pytest.mark.parametrize("value, rule, ok", [
    (1e-6, "> 0", True), (0.0, "> 0", False), (-0.01, "> 0", False), (0, ">= 0", True), (float("nan"), ">= 0", False),
    (1.0, "(0, 1]", True), (0.0, "(0, 1]", False), (1.5, "(0, 1]", False), (0.5, "[0, 1)", True), (1.0, "[0, 1)", False),
])
def test_ranges(value, rule, ok):
    if ok:
        check_ranges({"x": value}, {"x": rule})
    else:
        with pytest.raises(SystemExit) as e:
            check_ranges({"x": value, "y": 3}, {"x": rule, "y": ">= 1"})
        assert str(e.value) == f"config error: x={value!r} must be {'in ' * (rule[0] in '[(')}{rule}", str(e.value)


@pytest.mark.parametrize("argv", [["--lr=1e999"], ["--lr=-1e999"], ["--betas=(0.9, 1e999)"], ["--extra={'t': 1e999}"]])
def test_a_number_that_is_not_finite_is_rejected(argv):
    with pytest.raises(SystemExit) as e:
        configure(defaults(), argv)
    assert "is not a finite number" in str(e.value) and argv[0][2:].split("=")[0] in str(e.value), str(e.value)


def test_a_config_file_nan_names_the_line(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("steps = 4\nlr = float('nan')\n")
    with pytest.raises(SystemExit) as e:
        configure(defaults(), [str(cfg)])
    assert f"{cfg}:2: lr=nan is not a finite number" in str(e.value), str(e.value)


def test_ranges_reject_infinity():
    with pytest.raises(SystemExit) as e:
        check_ranges({"timeout": float("inf")}, {"timeout": "> 0"})
    assert str(e.value) == "config error: timeout=inf must be finite and > 0", str(e.value)


def test_keys_in_urls_are_never_printed(capsys):
    configure(defaults(), ["--url=https://api.example.com/v1beta/openai?key=SECRET&alt=sse", "--extra={'u': 'http://h/v1?key=SECRET'}"])
    out = capsys.readouterr().out
    assert "SECRET" not in out and "openai?key=***&alt=***" in out and "http://h/v1?key=***" in out, out
    with pytest.raises(SystemExit) as e:
        configure(defaults(), ["--steps=http://h/v1?key=SECRET"])
    assert "SECRET" not in str(e.value) and "key=***" in str(e.value), str(e.value)
    assert redact_url("url: /v1/chat/completions?key=SECRET (Caused by") == "url: /v1/chat/completions?key=*** (Caused by", \
        "a path with a query, as urllib3 names it in its errors"
    assert redact_url("why? because. http://h/v1") == "why? because. http://h/v1", "text and URLs without a query stay"
    assert redact_url("HTTP 301 to https://h/v1?key=SECRET: set judge_url") == "HTTP 301 to https://h/v1?key=***: set judge_url", \
        "the punctuation after a URL stays"


def test_help_lists_every_setting_with_its_default_config_value_and_comment():
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "train.py", "config/tiny.py", "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "config error" not in p.stderr, p.stderr[-2000:]
    lines = p.stdout.splitlines()
    assert "# I/O" in lines and "# judge" in lines, "grouped as in the source"
    assert "  --learning_rate=1e-06 -> 0.01 (config/tiny.py:15)" in lines, "the default and what the config file sets"
    assert any(l.startswith("  --keep_last=3  # complete checkpoints kept on disk") for l in lines), "and its comment"
    assert "  --eval_judge_model=None" in p.stdout and "set outside" not in p.stdout, "every setting a line of its own"
    for script in ("eval.py", "judge.py", "bench.py"):
        p = subprocess.run([sys.executable, script, "-h"], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0 and "  --out=" in p.stdout and "set outside" not in p.stdout, p.stdout[-2000:]
