"""Writing a run's files so that no reader ever sees half of one.

    write_atomic(path, write)   write(tmp) into a hidden sibling, fsync, rename onto `path`

A reader on another process or node sees the whole file or none; a writer killed half way
leaves a `.NAME.PID.partial` file that nothing reads (checkpoint.py skips them).
"""

import os
from pathlib import Path

PARTIAL = ".partial"  # suffix of a file still being written; never read


def write_atomic(path: str | Path, write) -> None:
    """write(tmp_path), then rename tmp_path to `path`: `path` is complete or absent. `write`
    may also be the text or bytes to write."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{PARTIAL}")
    if isinstance(write, (str, bytes)):
        data = write
        write = (lambda p: p.write_text(data)) if isinstance(data, str) else (lambda p: p.write_bytes(data))
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
