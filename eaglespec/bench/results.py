"""Benchmark result files: JSON named by what ran, the device and the date."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform

import torch


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-").replace("--", "-")


def write_result(name: str, payload: dict, device: torch.device | str, out_dir: str) -> str:
    """Write ``payload`` with device/date/software metadata; returns the file path."""
    return write_record(name, {"torch": torch.__version__, "cuda": torch.version.cuda, **payload},
                        device_name(device), out_dir)


def write_record(name: str, payload: dict, device: str, out_dir: str) -> str:
    """Write ``payload`` as ``NAME-DEVICE-DATE.json`` with the benchmark, ``device`` (a
    description, e.g. of the machine a training run used) and today's date; returns the path."""
    today = _dt.date.today().isoformat()
    record = {"benchmark": name, "device": device, "date": today, **payload}
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}-{slug(device)}-{today}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    return path
