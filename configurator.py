"""
The poor man's configurator, after nanoGPT's, with nanochat's fixes. A script defines its
settings as module globals with defaults, then calls `config = configure(globals())`, which
applies each config file named on the command line (Python files of overrides, e.g.
config/tiny.py, executed as such: run only your own), then each --key=value, parsed with
literal_eval (a bare word stays a string). A value must have its default's type (None takes
anything, an int may stand for a float); unknown keys are refused with the nearest names; a
number must be finite. Bad input exits at once, naming the file:line or flag. --help lists every
setting. check_ranges then checks the values against the rules written beside the settings.
"""
import ast
import difflib
import math
import os
import re
import shlex
import shutil
import sys
import traceback

SETTING_TYPES = (bool, int, float, str, tuple, list, dict, type(None))
ALSO_ALLOWED = {"resume": ("auto",)}  # values a setting takes beside those of its default's type


def _fail(msg):
    sys.exit(f"config error: {redact_url(msg)}")


_QUERY = re.compile(r"((?:[a-z][a-z0-9+.-]*://|/)[^\s?#'\"<>]*\?)([^\s#'\"<>]*?)(?=[.,;:)]*(?:[\s#'\"<>]|$))", re.I)


def redact_url(text):
    """Some providers take the API key in the URL (?key=...): every query value of every URL
    or path in text becomes ***, wherever a URL is printed or stored (messages, logs, state.pt)."""
    return _QUERY.sub(lambda m: m[1] + (re.sub(r"=[^&;]*", "=***", m[2]) if "=" in m[2] else "***"), str(text))


def _finite(v):
    """No inf or NaN anywhere in a setting, inside tuples, lists and dicts too."""
    if isinstance(v, dict):
        v = list(v.values())
    if isinstance(v, (tuple, list)):
        return all(_finite(x) for x in v)
    return not isinstance(v, float) or math.isfinite(v)


def _surrogates(text):
    """A command-line byte that is not UTF-8 reaches Python as a lone surrogate, which no file can hold."""
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _check(keys, key, value, where, g=None):
    if isinstance(value, str) and not value.isprintable() and _surrogates(value):
        _fail(f"{where}: {key}={value!r} is not valid UTF-8 (a byte such as \\xff in the name): use UTF-8 text")
    if not _finite(value):
        _fail(f"{where}: {key}={value!r} is not a finite number")
    if key not in keys:
        near = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
        _fail(f"{where}: unknown key '{key}'" + (f" (did you mean {', '.join(near)}?)" if near else ""))
    default = keys[key]
    if default is None or type(value) is type(default) or value in ALSO_ALLOWED.get(key, ()):
        return value
    if type(default) is float and type(value) is int:
        return float(value)
    if type(default) in (tuple, list) and type(value) in (tuple, list):
        return type(default)(value)
    also = "".join(f" or {v!r}" for v in ALSO_ALLOWED.get(key, ()))
    now = g[key] if g is not None else default
    source = f"set in {ORIGIN[key]}" if key in ORIGIN else "its default"
    _fail(f"{where}: {key} must be {type(default).__name__} like {now!r} ({source}){also}, "
          f"got {type(value).__name__} {value!r}")


ORIGIN = {}  # setting -> where its value came from: 'config/tiny.py:12' or '--key'; absent: the default


def configure(g, argv=None, about=""):
    """Override the settings in dict g (module globals) from argv; return {key: value}.
    --help or -h: print every setting instead (see settings_help) and exit; `about` comes first."""
    argv = sys.argv[1:] if argv is None else argv
    keys = {k: v for k, v in g.items()  # UPPER_CASE names are constants, not settings
            if not k.startswith("_") and not k.isupper() and isinstance(v, SETTING_TYPES)}
    asked = any(a in ("--help", "-h") for a in argv)
    verbose = int(os.environ.get("RANK", 0)) == 0 and not asked  # print on the master only
    for arg in (a for a in argv if a not in ("--help", "-h")):
        if not arg.startswith("--"):
            # a config file: exec it alone, then check each name it set, with its line
            try:
                src = open(arg).read()
                tree = ast.parse(src, arg)
            except (OSError, SyntaxError) as e:
                _fail(f"cannot read config file {arg}: {e}")
            lines = {t.id: node.lineno for node in tree.body if isinstance(node, ast.Assign)
                     for t in node.targets if isinstance(t, ast.Name)}
            scope = {}
            try:
                exec(compile(tree, arg, "exec"), scope)
            except Exception as e:  # noqa: BLE001 -- a config file is Python: name its line, not a traceback
                line = next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__)) if f.filename == arg), "?")
                _fail(f"{arg}:{line}: {type(e).__name__}: {e}")
            set_here = [k for k, v in scope.items() if not k.startswith("_") and isinstance(v, SETTING_TYPES)]
            for k in set_here:  # not imports or helpers
                g[k] = _check(keys, k, scope[k], f"{arg}:{lines.get(k, '?')}", g)
                ORIGIN[k] = f"{arg}:{lines.get(k, '?')}"
            if verbose:
                print(f"config file {arg}: {len(set_here)} settings (python {os.path.basename(sys.argv[0])} {arg} "
                      "--help lists every setting and its value)")
            continue
        if "=" not in arg:
            _fail(f"'{arg}' must look like --key=value (--help lists the settings)")
        key, val = arg[2:].split("=", 1)  # the value may itself contain '='
        try:
            parsed = ast.literal_eval(val)
        except (SyntaxError, ValueError):
            parsed = val  # a bare string, e.g. --out_dir=out/run1
        if not (isinstance(keys.get(key), str) and not isinstance(parsed, str)):
            val = parsed  # but --run_name=42 stays the string '42'
        g[key] = _check(keys, key, val, f"--{key}", g)
        ORIGIN[key] = f"--{key}"
        if verbose:
            print(f"override: {key} = {redact_url(repr(g[key]))}")
    if asked:
        print(settings_help(g, keys, about))
        sys.exit(0)
    return {k: g[k] for k in keys}


def settings_help(g, defaults, about=""):
    """Every setting of the script that g belongs to, read from its source: grouped under the
    comment lines that head them, each with its default, the value a config file or flag set, and
    its comment. Settings are module globals, or globals set under the `__main__` guard."""
    path = g.get("__file__") or sys.argv[0]
    src = open(path, encoding="utf-8").read()
    lines = src.splitlines()
    body = [n for node in ast.parse(src).body
            for n in (node.body if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) else [node])]
    out, shown = [about] if about else [], set()
    script = os.path.basename(path)
    out.append(f"usage: python {script} [CONFIG.py ...] [--key=value ...]: config files of overrides, then flags.\n"
               "Each setting with its default; '->' what the config files and flags given set; then what it does.")
    for node in body:
        if not isinstance(node, ast.Assign):
            continue
        targets = [t for target in node.targets for t in (target.elts if isinstance(target, ast.Tuple) else [target])]
        names = [t.id for t in targets if isinstance(t, ast.Name) and t.id in defaults and t.id not in shown]
        if not names:
            continue
        k = node.lineno - 1  # the comment block above it, if any, heads a group
        while k > 0 and lines[k - 1].lstrip().startswith("#"):
            k -= 1
        head = [line.strip() for line in lines[k:node.lineno - 1] if not line.lstrip().startswith("# ---")]
        out.extend(["", *head] if head else [])
        for name in names:
            shown.add(name)
            now = f" -> {redact_url(repr(g[name]))} ({ORIGIN[name]})" if name in ORIGIN else ""
            note = lines[node.end_lineno - 1].partition("  # ")[2]  # the line's comment
            out.append(f"  --{name}={redact_url(repr(defaults[name]))}{now}" + (f"  # {note}" if note else ""))
    rest = [k for k in defaults if k not in shown]
    if rest:
        out.append("\nset outside these lines: " + ", ".join(rest))
    return "\n".join(out)


def _in_range(v, rule):
    if rule[0] in "[(":  # an interval: [0, 1] closed, (0, 1] open on the left
        lo, hi = (float(x) for x in rule[1:-1].split(","))
        return (v >= lo if rule[0] == "[" else v > lo) and (v <= hi if rule[-1] == "]" else v < hi)
    op, bound = rule.split()
    return {">": v > float(bound), ">=": v >= float(bound)}[op]


def check_ranges(c, rules):
    """rules: {key: '> 0' | '>= 1' | '[0, 1]' | '(0, 1]' | ...}. Exits naming every value of c
    outside its range (NaN is outside every range, and so is inf), before any expensive work."""
    bad = [f"{k}={c[k]!r} must be {'finite and ' * (abs(c[k]) == math.inf)}{'in ' * (rule[0] in '[(')}{rule}"
           + (f" ({ORIGIN[k]})" if k in ORIGIN else "")
           for k, rule in rules.items() if k in c and not (_finite(c[k]) and _in_range(c[k], rule))]
    if bad:
        _fail("; ".join(bad))


def command(script, drop=(), add=()):
    """The command line that ran `script`, as a person would type it again: the same config files
    and flags, less those whose key is in `drop`, plus the flags in `add` (e.g. '--resume=auto').
    Under torchrun on one node, its torchrun line; on several, the script's part of each node's line."""
    python = "python" if shutil.which("python") else sys.executable
    launch = f"{python} {script}"
    if "LOCAL_WORLD_SIZE" in os.environ:  # torchrun
        local, world = os.environ["LOCAL_WORLD_SIZE"], os.environ.get("WORLD_SIZE", "1")
        launch = (f"torchrun --standalone --nproc_per_node={local} {script}" if local == world else
                  f"(each node's torchrun line, as before) {script}")
    keep = [a for a in sys.argv[1:] if a.split("=", 1)[0][2:] not in drop or not a.startswith("--")]
    return " ".join([launch] + [shlex.quote(redact_url(a)) for a in keep + list(add)])
