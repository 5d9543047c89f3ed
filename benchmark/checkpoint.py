"""Checkpoints: a killed run continues bit-identically, and only files this harness wrote are loaded.

A checkpoint holds the whole training state after a step: the method (student, EMA teacher, frozen
reference encoder, any running statistics: ``Method.state_dict``), the optimiser (moments and step
counts), the step (the schedule is a pure function of it, and the samplers are re-created from their
seeds and skip the requests already trained on, see ``benchmark.distributed.BatchShare``), the random
generators of every process (torch's global one and CUDA's, the method's own, numpy's and Python's
global ones), the select curve so far, the DVCLive log as of that step and the wall time spent. It is
written atomically (temporary file, then rename), so a kill at any moment leaves either the previous
checkpoint or the new one.

A checkpoint resumes only the run that made it. Its fingerprint holds hashes of the resolved
configuration, of the data splits and of the harness code (every ``.py`` file of ``benchmark/`` and
``methods/``), and the number of processes; if any differs, the run starts fresh and says which.

Files are read with ``torch.load(weights_only=True)`` (tensors and plain containers, never code) and
must carry this harness's ``kind`` marker; anything else is refused with ``CheckpointError`` naming the
file.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from benchmark.formats import write_bytes_atomic

REPO = Path(__file__).resolve().parents[1]
KIND = "uda-seg-bench checkpoint"
WARM_START_KIND = "uda-seg-bench warm start"
VERSION = 1
#: The packages whose code a checkpoint's training depends on.
CODE_PACKAGES = ("benchmark", "methods")
_FINGERPRINT_NAMES = {
    "config": "configuration",
    "splits": "data splits",
    "code": "harness code (benchmark/, methods/)",
    "processes": "number of processes",
}


class CheckpointError(ValueError):
    """A file is not a checkpoint of this harness, or cannot be read as one."""


def to_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def load_trusted(path: Path | str, kind: str = KIND) -> dict:
    """Read ``path`` with ``weights_only=True`` and check it is a ``kind`` written by this harness."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    refused = f"{path}: refused, not a {kind} of this harness"
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of foreign files
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if found:
            raise CheckpointError(
                f"{refused}: it holds a Python object ({found.group(1)}); only tensors and plain containers are "
                "ever loaded, since unpickling an object can run code"
            ) from None
        raise CheckpointError(f"{refused}: not a torch.save file of tensors and plain containers") from None
    except Exception as error:  # torch.load raises many types for damaged or foreign files
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{refused}: unreadable ({reason})") from None
    if not isinstance(state, dict) or state.get("kind") != kind:
        found = f"kind {state.get('kind')!r}" if isinstance(state, dict) and "kind" in state else "no kind marker"
        raise CheckpointError(f"{refused} ({found}; a state dict saved by other code?)")
    return state


def code_digest(root: Path = REPO) -> str:
    """A hash of the harness code: every ``.py`` file under ``benchmark/`` and ``methods/``."""
    digest = hashlib.sha256()
    for package in CODE_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def fingerprint(config: dict, split_hash: str, processes: int) -> dict:
    """What a checkpoint must share with a run to resume it. ``config``: the resolved run
    configuration as plain data."""
    return {
        "config": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
        "splits": split_hash,
        "code": code_digest(),
        "processes": processes,
    }


def resumable(path: Path | str, expected: dict) -> tuple[dict | None, str]:
    """The checkpoint at ``path`` if it belongs to the run with fingerprint ``expected``, with a
    message saying what happens; ``(None, "")`` when there is none. A file that is not a checkpoint
    of this harness raises ``CheckpointError``: it is never overwritten silently."""
    path = Path(path)
    if not path.is_file():
        return None, ""
    state = load_trusted(path, KIND)
    found = state.get("fingerprint", {})
    changed = [_FINGERPRINT_NAMES[key] for key in expected if found.get(key) != expected[key]]
    if changed:
        return None, f"{path} was made with another {', '.join(changed)}: starting fresh"
    return state, f"resuming from {path} at step {state['step']}"


def rng_state(method_generator: torch.Generator, device: torch.device) -> dict:
    """Every random generator a training step may draw from, in this process."""
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "method": method_generator.get_state(),
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "python": random.getstate(),
    }


def set_rng_state(state: dict, method_generator: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    method_generator.set_state(state["method"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def read_log(directory: Path | str) -> dict[str, str]:
    """The text files of a DVCLive folder, by relative path (saved with a checkpoint)."""
    directory = Path(directory)
    if not directory.is_dir():
        return {}
    return {
        path.relative_to(directory).as_posix(): path.read_text()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def write_log(directory: Path | str, files: dict[str, str]) -> None:
    """Put a DVCLive folder back as ``read_log`` saw it (lines logged after the checkpoint go)."""
    directory = Path(directory)
    shutil.rmtree(directory, ignore_errors=True)
    for name, text in files.items():
        write_bytes_atomic(directory / name, text.encode())


def remove_stale_temporaries(path: Path | str) -> None:
    """Delete temporary files a killed atomic write of ``path`` left behind (``.NAME.*.tmp``)."""
    path = Path(path)
    if path.parent.is_dir():
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)


def save(
    path: Path | str,
    *,
    fingerprint: dict,
    step: int,
    method: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    rng: list[dict],
    select_curve: list,
    log: dict[str, str],
    wall_time_s: float,
) -> None:
    """Write the training state after ``step`` steps atomically. ``rng``: ``rng_state`` of every
    process, in rank order."""
    state = {
        "kind": KIND,
        "version": VERSION,
        "fingerprint": fingerprint,
        "step": step,
        "method": method.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": rng,
        "select_curve": [list(point) for point in select_curve],
        "log": log,
        "wall_time_s": wall_time_s,
    }
    write_bytes_atomic(path, to_bytes(state))


def restore(state: dict, method, optimizer: torch.optim.Optimizer) -> int:
    """Load a checkpoint's method and optimiser state into freshly built ones; returns its step. The
    random generators are put back separately (``set_rng_state``), once nothing else draws from them."""
    method.load_state_dict(state["method"])
    optimizer.load_state_dict(state["optimizer"])
    return state["step"]
