"""What every benchmark writes: a JSON record with the device, torch version and git sha."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def write_record(out_dir: str, name: str, device: str, **fields) -> str:
    """``out_dir/name.json`` with the common provenance fields, written atomically."""
    from glm.checkpoint import atomic_write

    os.makedirs(out_dir, exist_ok=True)
    record = {"device": device_name(device), "torch": torch.__version__, "git_sha": git_sha(),
              "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **fields}
    path = os.path.join(out_dir, name + ".json")
    atomic_write(path, json.dumps(record, indent=2).encode())
    return path
