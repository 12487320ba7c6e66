"""Time training epochs fed the guide's way (a DataLoader) against mnist_train's tensors on the device.

Same model, loss, optimizer, schedule, batch size and train_epoch for every row; only
the way batches arrive differs (plus (c0)'s unfused Adam, and on CUDA the CUDA-graph replay):

    (a) DataLoader over torchvision MNIST, ToTensor + Normalize, shuffled, num_workers=0
    (b) the same with worker processes
    (c) the whole set as tensors on the device, a randperm per epoch (mnist_train's way)
    (c0) for scale: (c)'s tensors with a plain step: x[index] gathers and Adam's default
         (unfused) update, i.e. what mnist_train's per-step choices save
    (d) (c) with each step replayed as a CUDA graph (bench/cuda_graph.py, once mnist_train's --cuda-graph)

Run: python bench/benchmark.py --data-dir ./data [--device auto] [--epochs 3]
"""

import argparse
import math
import os
import platform
import statistics
import sys
import time

import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import cuda_graph  # noqa: E402  (beside this file)

import mnist_train as mt  # noqa: E402


def dataloader_epochs(data_dir, batch_size, workers, device, generator):
    """An endless source of epochs: each a generator of (x, y) on `device`, from a shuffled DataLoader."""
    transform = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((mt.MNIST_MEAN,), (mt.MNIST_STD,))]
    )
    dataset = datasets.MNIST(data_dir, train=True, download=True, transform=transform)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        generator=generator,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )
    while True:
        yield (
            (x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in loader
        )


def setup_way(make_train, device, seed, epochs, steps_per_epoch, fused=True):
    """A fresh model, loss, optimizer and schedule from `seed`; return (model, loss_fn, train)."""
    torch.manual_seed(seed)
    model, loss_fn = mt.build_model(device), mt.make_loss()
    if fused:
        optimizer = mt.make_optimizer(model)
    else:  # Adam as the guide writes it: PyTorch picks its default (unfused) implementation
        optimizer = torch.optim.Adam(model.parameters(), lr=mt.DEFAULT_LR["adam"])
    scheduler = mt.make_scheduler(optimizer, epochs * steps_per_epoch)
    return model, loss_fn, make_train(model, loss_fn, optimizer, scheduler)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="./data")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--epochs",
        type=int,
        default=4,
        help="per way; the first is reported apart (warm-up, capture)",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--workers", type=int, default=min(4, os.cpu_count() or 1), help="for way (b)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = mt.pick_device(args.device)
    x_train, y_train = mt.load_mnist(args.data_dir, train=True, device=device)
    test_set = mt.load_mnist(args.data_dir, train=False, device=device)
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    bs = args.batch_size

    def loader_way(workers):
        def make_train(model, loss_fn, optimizer, scheduler):
            generator = torch.Generator().manual_seed(args.seed)
            epochs = dataloader_epochs(args.data_dir, bs, workers, device, generator)
            return lambda: mt.train_epoch(model, next(epochs), loss_fn, optimizer, scheduler)

        return make_train

    def tensors_way(model, loss_fn, optimizer, scheduler):
        generator = torch.Generator().manual_seed(args.seed)
        batches = lambda: mt.iterate_batches(x_train, y_train, bs, generator)  # noqa: E731
        return lambda: mt.train_epoch(model, batches(), loss_fn, optimizer, scheduler)

    def plain_way(model, loss_fn, optimizer, scheduler):
        generator = torch.Generator().manual_seed(args.seed)

        def batches():
            order = torch.randperm(len(x_train), generator=generator).to(device)
            return ((x_train[index], y_train[index]) for index in order.split(bs))

        return lambda: mt.train_epoch(model, batches(), loss_fn, optimizer, scheduler)

    def graph_way(model, loss_fn, optimizer, scheduler):
        generator = torch.Generator().manual_seed(args.seed)
        train = cuda_graph.make_graphed_train_epoch(
            model, loss_fn, optimizer, scheduler, x_train, y_train, bs
        )
        return lambda: train(generator)

    ways = [  # (name, make_train, fused optimizer)
        ("(a) DataLoader, ToTensor+Normalize, 0 workers", loader_way(0), True),
        (f"(b) DataLoader, {args.workers} workers", loader_way(args.workers), True),
        ("(c) tensors on device (mnist_train)", tensors_way, True),
        ("(c0) tensors on device, plain step (x[index], unfused Adam)", plain_way, False),
    ]
    if device.type == "cuda":
        ways.append(("(d) tensors + CUDA graph (bench/cuda_graph.py)", graph_way, True))

    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(
        f"benchmark: torch {torch.__version__}, device {device}{gpu}, {os.cpu_count()} CPUs "
        f"({platform.processor() or platform.machine()}), {torch.get_num_threads()} torch threads, "
        f"batch {bs}, {args.epochs} epochs per way, seed {args.seed}",
        flush=True,
    )
    # Epochs are interleaved (one of each way in turn) so that a noisy machine slows
    # every way alike: the speed-up ratios hold even when absolute seconds drift.
    setups = [
        setup_way(make_train, device, args.seed, args.epochs, steps_per_epoch, fused)
        for _, make_train, fused in ways
    ]
    seconds = [[] for _ in ways]
    for epoch in range(args.epochs):
        for (_, _, train), times in zip(setups, seconds):
            start = time.perf_counter()
            train()  # returns the epoch's mean loss via .item(): the device has finished
            times.append(time.perf_counter() - start)
        print(f"  epoch {epoch + 1}/{args.epochs} done for every way", file=sys.stderr, flush=True)
    rows = []
    for (name, _, _), (model, loss_fn, _), times in zip(ways, setups, seconds):
        _, accuracy = mt.evaluate(model, mt.iterate_batches(*test_set, mt.EVAL_BATCH_SIZE), loss_fn)
        steady = statistics.median(times[1:]) if len(times) > 1 else times[0]
        rows.append({"way": name, "first": times[0], "epoch": steady, "accuracy": accuracy})
    baseline = rows[0]["epoch"]
    # The first epoch's extra seconds are the one-off cost (worker start-up, graph capture):
    # a way that costs more up front pays off after extra / (saving per epoch) epochs.
    print(
        f"| way | first epoch s | one-off extra s | epoch s (median of rest) | images/s | speed-up vs (a) "
        f"| test acc after {args.epochs} |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['way']} | {row['first']:.2f} | {row['first'] - row['epoch']:.2f} | {row['epoch']:.3f} "
            f"| {len(x_train) / row['epoch']:,.0f} | {baseline / row['epoch']:.1f}x | {100 * row['accuracy']:.2f}% |"
        )
    return rows


if __name__ == "__main__":
    main()
