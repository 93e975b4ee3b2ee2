"""Is the S3 shard reader fast enough to keep a training process fed?

Prepares a dataset of real English text (Python's pydoc topics, repeated) on a loopback S3 server
(moto), then measures in one run:

* reader: bytes/s that `RowStreams` over `ShardSource` delivers (ranged GETs, sha256 checks,
  background prefetch) at the paper's per-GPU layout (256 rows x 256 characters per step);
* trainer: bytes/s one training process consumes at the paper's model size (4096-unit mLSTM,
  forward + backward + Adam) on this machine.

It prints both and their ratio (the data issue asks for > 10). It reports and never asserts.

    python bench/data_throughput.py --dataset-mib 64 --shard-mib 8
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mlstm_platform.prepare import PrepareOptions, prepare_dataset
from mlstm_trainer.model import MLSTM
from mlstm_trainer.shard_source import ShardSource
from mlstm_trainer.shards import read_manifest
from mlstm_trainer.storage import S3Settings, S3Store
from mlstm_trainer.streams import RowStreams


def write_text(folder: Path, mib: int) -> list[Path]:
    """About `mib` MiB of real English text, one file per pydoc topic per repetition."""
    from pydoc_data.topics import topics

    texts = [topics[key] for key in sorted(topics)]
    size, paths, copy = 0, [], 0
    while size < mib << 20:
        for index, text in enumerate(texts):
            path = folder / f"{copy:04d}-{index:03d}.txt"
            path.write_text(text, encoding="utf-8")
            paths.append(path)
            size += len(text.encode())
        copy += 1
    return paths


def reader_bytes_per_s(store: S3Store, rows: int, seq_len: int, prefetch: int, workers: int) -> tuple[float, int]:
    """Bytes/s over one epoch of the train split, shard fetches and checksums included."""
    source = ShardSource(store, read_manifest(store), "train", workers=workers)
    streams = RowStreams(source, global_rows=rows, seq_len=seq_len, prefetch_steps=prefetch)
    started = time.perf_counter()
    delivered = 0
    for _ in range(streams.steps_per_epoch):
        delivered += streams.next_batch().tokens
    elapsed = time.perf_counter() - started
    source.close()
    return delivered / elapsed, delivered


def trainer_bytes_per_s(hidden: int, batch: int, seq_len: int, steps: int) -> float:
    """Characters/s of fp32 training steps of the paper-size model on this CPU (after one warm-up step)."""
    torch.manual_seed(0)
    model = MLSTM(vocab_size=256, embed_dim=64, hidden_size=hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)  # as the trainer builds it
    tokens = torch.randint(0, 256, (batch, seq_len + 1))
    times = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        logits, _ = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 256), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return batch * seq_len / (sum(times[1:]) / steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset-mib", type=int, default=64)
    parser.add_argument("--shard-mib", type=int, default=8)
    parser.add_argument("--rows", type=int, default=256, help="rows per process (32768 global / 128 GPUs)")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--prefetch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--train-batch", type=int, default=8, help="a CPU-sized batch for the trainer side")
    parser.add_argument("--train-seq", type=int, default=32)
    parser.add_argument("--train-steps", type=int, default=3)
    args = parser.parse_args()

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        settings = S3Settings(endpoint=f"http://{host}:{port}", access_key="bench", secret_key="bench", region="us-east-1")
        store = S3Store("s3://bench/pydoc", settings)
        store.ensure_bucket()
        with tempfile.TemporaryDirectory() as tmp:
            inputs = write_text(Path(tmp), args.dataset_mib)
            prepare_dataset(inputs, store, PrepareOptions(shard_bytes=args.shard_mib << 20))
        reader, delivered = reader_bytes_per_s(store, args.rows, args.seq, args.prefetch, args.workers)
    finally:
        server.stop()
    trainer = trainer_bytes_per_s(args.hidden, args.train_batch, args.train_seq, args.train_steps)
    print(f"reader   {reader / 1e6:10.2f} MB/s  ({delivered / 1e6:.1f} MB over one epoch, {args.rows} rows x {args.seq})")
    print(f"trainer  {trainer / 1e6:10.6f} MB/s  (hidden {args.hidden}, fp32, {torch.get_num_threads()} threads)")
    print(f"ratio reader/trainer = {reader / trainer:,.0f}  (target > 10)")


if __name__ == "__main__":
    main()
