"""Files a run leaves behind, written so that a crash never leaves a half-written one."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Callable

import yaml


def save_atomically(dest: str, write: Callable[[str], None]) -> None:
    """Let ``write`` fill a temporary directory beside ``dest``, then move it into place."""
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.", dir=parent)
    try:
        write(tmp)
        if os.path.exists(dest):
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomically(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: str, obj) -> None:
    write_text_atomically(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_yaml(path: str, obj) -> None:
    write_text_atomically(path, yaml.safe_dump(obj, sort_keys=False))
