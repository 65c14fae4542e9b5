"""What a run pays to keep its files on an object store: dopsd_ray.storage against a raw
pyarrow.fs copy of the same bytes, per checkpoint and per export, at two model sizes.

    python benchmarks/storage.py [--rounds 7] [--out FILE.json]

Starts its own S3-protocol server (moto, a process of its own, on loopback) unless
AWS_ENDPOINT_URL names one. Per size it writes one real checkpoint (write_checkpoint_files:
LoRA student and EMA teacher, AdamW state, fp32 EMA shadow) and one real export
(weights.export: the diffusers and ComfyUI LoRA files) to a local folder, then, in paired
rounds (the order alternates inside each pair), uploads it with what the learner uses
(Storage.put_dir: each file whole, state.json last) and with pyarrow.fs.copy_files, and
downloads it with what a resuming node uses (Storage.fetch_dir) and with copy_files.
Sizes: `tiny` (configs/tiny.yaml's model) and `bench` (benchmarks/bench_model.py's
d512 x 4 layers, LoRA rank 64). Prints medians; the JSON keeps every round.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow.fs as pafs  # noqa: E402
import torch  # noqa: E402

from benchmarks.bench_model import make_transformer, write_result  # noqa: E402
from dopsd_ray.checkpoint import STATE_FILE, write_checkpoint_files  # noqa: E402
from dopsd_ray.config import LoraSettings  # noqa: E402
from dopsd_ray.families import comfyui_keys, lora_targets, pipeline_class  # noqa: E402
from dopsd_ray.storage import Storage  # noqa: E402
from dopsd_ray.weights import STUDENT, make_weights, state_dict  # noqa: E402

BUCKET = "dopsd-bench"


def start_server() -> subprocess.Popen | None:
    """moto's S3 server on a free loopback port, its endpoint and test credentials in the environment."""
    if os.environ.get("AWS_ENDPOINT_URL"):
        return None
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"], region="us-east-1",
                      allow_bucket_creation=True).create_dir(BUCKET)
    return server


def transformer(size: str):
    if size == "tiny":
        from dopsd_ray.families.zimage import build_tiny_zimage
        from diffusers import ZImageTransformer2DModel

        path = build_tiny_zimage(Path(tempfile.mkdtemp(prefix="bench-tiny-")), seed=0)
        return ZImageTransformer2DModel.from_pretrained(str(path / "transformer")), LoraSettings(rank=8, alpha=16)
    return make_transformer(dim=512, layers=4), LoraSettings(rank=64, alpha=64)


def files_of(size: str, folder: Path) -> tuple[Path, Path]:
    """(a checkpoint folder, an export folder) of this size, written the way a run writes them."""
    module, lora = transformer(size)
    weights = make_weights(module, lora, lora_targets("zimage"))
    params = list(weights.trainable_parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    student = {k: v.detach().clone() for k, v in state_dict(weights, STUDENT).items()}
    ema = {k: v.float() for k, v in student.items()}
    checkpoint = write_checkpoint_files(folder / "checkpoint", 0, 1, 10, {}, optimizer, student, student, ema)
    weights.export(folder / "export", pipeline_class("zimage"), state=student, comfyui=comfyui_keys("zimage"))
    return checkpoint, folder / "export"


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def pair_rounds(local: Path, store: Storage, kind: str, rounds: int) -> dict:
    """Paired rounds of (storage, raw) uploads, then downloads, alternating which goes first."""
    times = {"upload": [], "upload_raw": [], "download": [], "download_raw": []}
    local_fs = pafs.LocalFileSystem()
    for r in range(rounds):
        ours, raw = f"{kind}-{r}-ours", f"{kind}-{r}-raw"
        up = [("upload", lambda: store.put_dir(local, ours, last=(STATE_FILE,))),
              ("upload_raw", lambda: pafs.copy_files(str(local), store.path(raw), source_filesystem=local_fs,
                                                     destination_filesystem=store.fs))]
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            (Path(b) / "x").mkdir()  # copy_files writes into an existing local folder
            down = [("download", lambda: store.fetch_dir(ours, Path(a) / "x")),
                    ("download_raw", lambda: pafs.copy_files(store.path(raw), str(Path(b) / "x"),
                                                             source_filesystem=store.fs,
                                                             destination_filesystem=local_fs))]
            for ops in (up, down):
                for name, fn in (ops if r % 2 == 0 else ops[::-1]):
                    times[name].append(timed(fn))
    return times


def summarize(times: dict, nbytes: int) -> dict:
    out = {"bytes": nbytes}
    for name, values in times.items():
        values = sorted(values)
        out[name] = {"median_s": statistics.median(values), "p90_s": values[int(0.9 * (len(values) - 1))],
                     "max_s": values[-1], "all_s": values}
    for op in ("upload", "download"):
        ratios = [a / b for a, b in zip(times[op], times[f"{op}_raw"], strict=True)]
        out[f"{op}_ratio"] = {"median": statistics.median(ratios), "max": max(ratios)}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "bench"])
    parser.add_argument("--out", default=None, help="the JSON file (default benchmarks/results/storage-<host>.json)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    server = start_server()
    results = {"endpoint": os.environ["AWS_ENDPOINT_URL"], "rounds": args.rounds, "sizes": {}}
    try:
        for size in args.sizes:
            with tempfile.TemporaryDirectory(prefix=f"bench-storage-{size}-") as tmp:
                checkpoint, export = files_of(size, Path(tmp))
                store = Storage(f"s3://{BUCKET}/{size}-{int(time.time())}")
                results["sizes"][size] = {kind: summarize(pair_rounds(folder, store, kind, args.rounds),
                                                          folder_bytes(folder))
                                          for kind, folder in (("checkpoint", checkpoint), ("export", export))}
    finally:
        if server is not None:
            server.terminate()
    print(f"{'size':<6} {'what':<11} {'MB':>7} {'up ours':>8} {'up raw':>8} {'ratio':>6} "
          f"{'down ours':>9} {'down raw':>9} {'ratio':>6}   (medians of {args.rounds} paired rounds, s)")
    for size, kinds in results["sizes"].items():
        for kind, r in kinds.items():
            print(f"{size:<6} {kind:<11} {r['bytes'] / 1e6:>7.2f} {r['upload']['median_s']:>8.3f} "
                  f"{r['upload_raw']['median_s']:>8.3f} {r['upload_ratio']['median']:>6.2f} "
                  f"{r['download']['median_s']:>9.3f} {r['download_raw']['median_s']:>9.3f} "
                  f"{r['download_ratio']['median']:>6.2f}")
    write_result(results, args.out, "storage")
    return 0


if __name__ == "__main__":
    sys.exit(main())
