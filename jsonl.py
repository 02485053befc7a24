"""
JSONL rows read and written one way everywhere. read() skips a last line cut off by a writer (one
warning) and never changes the file, unless repair=True for a file the caller owns. write() and
write_text() replace a whole file through a temporary one, never half of either; append() with
sync=True flushes at once, and a failed write leaves no half line.
"""
import json
import os
import sys
import tempfile


def read(path, numbered=False, must_exist=True, repair=False):
    """The rows of a JSONL file (with numbered=True, (line number, row) pairs). A line that is not
    UTF-8 or not JSON raises ValueError naming path:line, unless it is the last line and has no
    newline (a writer cut off). A missing file is an error, or [] with must_exist=False."""
    if not os.path.exists(path):
        if must_exist:
            raise ValueError(f"{path}: no such file")
        return []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    rows, cut = [], None
    for k, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            if k == len(lines):
                cut = k
                continue
            raise ValueError(f"{path}:{k}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})") from None
        except json.JSONDecodeError as e:
            if k == len(lines):  # the last line, without its newline: cut off
                cut = k
                continue
            raise ValueError(f"{path}:{k}: invalid JSON ({e.msg})") from None
        rows.append((k, row) if numbered else row)
    if cut:
        if repair:
            print(f"{path}:{cut}: removing a half-written last line left by an interrupted run", file=sys.stderr)
            write(path, [r for _, r in rows] if numbered else rows)
        else:
            print(f"warning: {path}:{cut}: skipping a half-written last line (a writer cut off, or still writing)",
                  file=sys.stderr)
    return rows


def write_text(path, text):
    """The whole file at once: beside it (a name of its own: writers may race), flushed to disk,
    renamed over it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write(path, rows):
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=1))


def append(path, rows, sync=False):
    """Append rows (a list of dicts) in one write; sync: flushed to disk at once, and a failed
    write (a full disk) leaves the file as it was instead of a half line."""
    size = os.path.getsize(path) if os.path.exists(path) else 0
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
            if sync:
                f.flush()
                os.fsync(f.fileno())
    except OSError:
        if sync and os.path.exists(path):
            os.truncate(path, size)
        raise
