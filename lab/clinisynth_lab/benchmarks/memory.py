"""Memory benchmark: peak RSS of the reward service process per request kind as requests grow.

Small uploads can declare huge images, so what a request costs must not grow with what it
declares. The reward service runs as its own process (``clinisynth-serve reward``, real Triton
behind it); before each request its peak RSS is reset (``/proc/<pid>/clear_refs``, 5) and read
back after (``VmHWM``), so each figure is that one request's peak. Kinds:

- ``png-bomb``: 4096² constant PNGs (~16 KB each), 1 → 4 (the default budget) → 8 (refused);
- ``small``: 64² PNGs, 1 → 256 (Score's image limit);
- ``dicom-bomb``: a deflated DICOM declaring 512² that inflates to 536 MB, 1 → 8;
- ``at-budget``: 512² PNGs, 1 → 256 (256 × 512² = the budget);
- ``enqueue-bomb``: EnqueueReview of distinct 4096² PNGs, 1 → 4 (the budget), each item scored
  by the default reward model as it is queued.

Printed: a table of peak RSS (median of ``--repeats``) and status per size, and per kind the
ratio of peak RSS at its largest size to one image (the goal: flat, ≤ 1.5×).

    clinisynth benchmark memory [--repeats 3] [--kinds png-bomb,small,dicom-bomb,at-budget]
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from typing import IO

KINDS: dict[str, tuple[int, ...]] = {
    "png-bomb": (1, 2, 4, 8),
    "small": (1, 16, 64, 256),
    "dicom-bomb": (1, 4, 8),
    "at-budget": (1, 16, 64, 256),
    "enqueue-bomb": (1, 2, 4),
}


def png_bomb(side: int, value: int = 7, mode: str = "L") -> bytes:
    """A constant image: a few KB of PNG that decodes to side² pixels."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (side, side), value).save(buf, format="PNG")
    return buf.getvalue()


def _noise_png(side: int, seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, (side, side), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def deflated_dicom(rows: int, cols: int, pixel_bytes: int, fill: int = 0) -> bytes:
    """Deflated Explicit VR Little Endian file declaring rows × cols 8-bit with ``pixel_bytes``
    of pixel data (a bomb when that is far more than rows × cols), compressed in 1 MB steps."""
    import struct
    import zlib

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import (
        DeflatedExplicitVRLittleEndian,
        SecondaryCaptureImageStorage,
        generate_uid,
    )

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    pixel_header = b"\xe0\x7f\x10\x00OB\x00\x00" + struct.pack("<I", pixel_bytes)
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [comp.compress(body.getvalue() + pixel_header)]
    block = bytes([fill]) * (1 << 20)
    left = pixel_bytes
    while left:
        n = min(left, len(block))
        parts.append(comp.compress(block[:n]))
        left -= n
    parts.append(comp.flush())
    out = DicomBytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta)
    return out.getvalue() + b"".join(parts)


def _peak_mb(pid: int, fn: Callable[[], object]) -> tuple[float, str]:
    """Peak RSS (MB) of process ``pid`` while ``fn`` runs, and "ok" or the error's status."""
    pathlib.Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    try:
        fn()
        status = "ok"
    except Exception as exc:
        status = type(exc).__name__.replace("Error", "") or "error"
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024, status
    raise RuntimeError("no VmHWM in /proc status")


SERVE = [sys.executable, "-m", "clinisynth_server.serve"]


def serve_process(
    service: str, env: Mapping[str, str], *, stderr: int | IO[bytes] | None = None
) -> tuple[subprocess.Popen[str], str, list[str]]:
    """``clinisynth-serve <service>`` on free ports, as its own process.

    Returns the process, its gRPC address and the lines it printed up to ``READY``; the rest
    of its stdout is drained so it never blocks on a full pipe.
    """
    proc = subprocess.Popen(
        [*SERVE, service, "--port", "0", "--metrics-port", "0"],
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    assert proc.stdout is not None
    printed: list[str] = []
    for line in proc.stdout:  # blocks until the service reports its ports (or exits)
        printed.append(line.rstrip("\n"))
        if line.startswith(f"READY {service} "):
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, f"127.0.0.1:{line.split('grpc=')[1].split()[0]}", printed
    raise RuntimeError(f"the {service} service exited with {proc.wait()} before READY")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clinisynth benchmark memory", description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kinds", default=",".join(KINDS))
    ns = parser.parse_args(argv)
    kinds = [k for k in ns.kinds.split(",") if k]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        parser.error(f"unknown kinds {unknown}; one of {list(KINDS)}")

    import torch

    import clinisynth
    from clinisynth.v1 import common_pb2
    from clinisynth_server import registry
    from clinisynth_server.catalog import Catalog
    from clinisynth_server.methods.reward_model import RewardModel, RewardModelConfig
    from clinisynth_server.reward.scoring import write_reward_folder
    from clinisynth_server.store import open_store
    from clinisynth_server.triton.client import TritonClient
    from clinisynth_server.triton.launcher import TritonServer

    work = pathlib.Path(tempfile.mkdtemp(prefix="clinisynth-bench-memory-"))
    torch.manual_seed(0)
    model = RewardModel(RewardModelConfig(num_classes=2, in_channels=1, backbone_width=8))
    folder = write_reward_folder(model, work / "reward", classes=["a", "b"], width=32)
    (work / "repo").mkdir()
    store = open_store(str(work / "store"))
    payloads: dict[str, Callable[[int], list[object]]] = {
        "png-bomb": lambda n: [png_bomb(4096)] * n,
        "small": lambda n: [_noise_png(64, i) for i in range(n)],
        "dicom-bomb": lambda n: [common_pb2.Image(dicom=deflated_dicom(512, 512, 536 << 20))] * n,
        # Smooth (compressible) 512² images so 256 of them fit one 16 MB message.
        "at-budget": lambda n: [png_bomb(512, i % 256) for i in range(n)],
        "enqueue-bomb": lambda n: [png_bomb(4096, 1 + i) for i in range(n)],
    }
    with TritonServer(work / "repo", strict=False) as triton:
        tclient = TritonClient(triton.grpc_url, timeout_s=300)
        registry.register_folder(
            folder,
            "bench-memory",
            catalog=Catalog(store, ttl_s=0),
            store=store,
            model_repository=work / "repo",
            triton=tclient,
            max_batch_size=64,
        )
        env = {
            **os.environ,
            "CLINISYNTH_TRITON_URL": triton.grpc_url,
            "CLINISYNTH_STORE_URL": str(work / "store"),
            "CLINISYNTH_REWARD_HTTP_PORT": "0",
            "CLINISYNTH_HOME": str(work),
        }
        if getattr(triton, "key_file", None):  # restricted Triton: the service reads the key
            env["CLINISYNTH_TRITON_KEY_FILE"] = str(triton.key_file)
        proc, address, _ = serve_process("reward", env, stderr=None)
        try:
            rows: list[tuple[str, int, float, str]] = []
            with clinisynth.Client(endpoints={"reward": address}, timeout=600) as c:
                c.score([png_bomb(32)], "a", model="bench-memory", resize=True)  # warm-up
                for kind in kinds:
                    for n in KINDS[kind]:
                        images = payloads[kind](n)
                        peaks, status = [], ""
                        call = (
                            functools.partial(c.review.enqueue, images, class_name="a")
                            if kind.startswith("enqueue")
                            else functools.partial(
                                c.score, images, "a", model="bench-memory", resize=True
                            )
                        )
                        for _ in range(ns.repeats):
                            peak, status = _peak_mb(proc.pid, call)
                            peaks.append(peak)
                            time.sleep(0.2)
                        rows.append((kind, n, statistics.median(peaks), status))
                        print(f"  {kind} x{n}: {rows[-1][2]:.0f} MB ({status})", flush=True)
                health = c.health().get("reward", "?")
        finally:
            proc.terminate()
            proc.wait(30)
            tclient.close()

    print("\n| request kind | images | peak RSS of the reward service (MB) | result |")
    print("|---|---|---|---|")
    for kind, n, peak, status in rows:
        print(f"| {kind} | {n} | {peak:.0f} | {status} |")
    print()
    for kind in kinds:
        mine = [r for r in rows if r[0] == kind]
        served = [r for r in mine if r[3] == "ok"]
        one, top = mine[0], (served or mine)[-1]  # the largest request that was served
        print(
            f"{kind}: peak at {top[1]} images ({top[3]}) / at 1 image = {top[2] / one[2]:.2f} "
            f"({top[2]:.0f} vs {one[2]:.0f} MB; goal ≤ 1.5)"
        )
    print(f"reward service health after the run: {health}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
