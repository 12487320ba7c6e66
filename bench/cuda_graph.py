"""One training epoch with each step replayed as one CUDA graph: the benchmark's way (d).

Until December 2026 this was mnist_train's --cuda-graph flag. It made a 5-epoch run's epochs about
10x faster on an H200 (1.1-1.6 s -> 0.12 s; bench/README.md), but the whole run lasts seconds either
way, and its 57 lines of hand-made CUDA machinery did not earn their place in a reference file
whose budget is 600 lines.
It lives on here, unchanged, so the measurement can be repeated: python bench/benchmark.py --device cuda.

On a GPU this small MLP is bound by launching tens of tiny kernels per step, not by
arithmetic; a captured graph launches them all at once. Same math as mnist_train.train_epoch.
"""

import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import mnist_train as mt  # noqa: E402


def make_graphed_train_epoch(model, loss_fn, optimizer, scheduler, x, y, batch_size):
    """Return train(generator) -> mean loss: train_epoch over iterate_batches(x, y, batch_size, generator),
    with each full batch replayed from one captured CUDA graph (CUDA and Adam only).

    Invariants (tested on a GPU): same weights as train_epoch, to a tolerance; stale .grad
    contents do not change a replayed step.
    """
    # A graph replays fixed memory addresses, so the batch, its indices and the running loss live in
    # tensors made once; the learning rate becomes a tensor the schedule updates in place
    # (capturable=True lets Adam read it, and its step count, on the GPU).
    for group in optimizer.param_groups:
        group["capturable"], group["lr"] = True, torch.tensor(float(group["lr"]), device=x.device)
    index = torch.zeros(batch_size, dtype=torch.long, device=x.device)
    x_batch, y_batch, loss_sum = (
        x[:batch_size].clone(),
        y[:batch_size].clone(),
        torch.zeros((), device=x.device),
    )

    def step():
        torch.index_select(x, 0, index, out=x_batch)
        torch.index_select(y, 0, index, out=y_batch)
        # train_step's zero_grad() sets .grad to None, so the captured backward writes fresh
        # gradients instead of adding to old ones: the gradient reset is in the graph.
        loss_sum.add_(
            mt.train_step(model, x_batch, y_batch, loss_fn, optimizer).detach() * batch_size
        )

    run_step = make_graph_replayer(step)

    def train(generator):
        model.train()
        loss_sum.zero_()
        order = torch.randperm(len(x), generator=generator).to(
            x.device
        )  # the order iterate_batches would use
        full = len(x) - len(x) % batch_size
        # Adam warns that capturable=True is slower outside a graph: true, and only the warm-up
        # steps and each epoch's last, smaller batch run outside it.
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message="This instance was constructed with capturable=True"
            )
            for start in range(0, full, batch_size):
                index.copy_(order[start : start + batch_size])
                run_step()
                scheduler.step()
            if full < len(x):  # the last, smaller batch runs eagerly: same step, other shape
                rest = order[full:]
                loss = mt.train_step(
                    model, x.index_select(0, rest), y.index_select(0, rest), loss_fn, optimizer
                )
                loss_sum.add_(loss.detach() * len(rest))
                scheduler.step()
        return (loss_sum / len(x)).item()

    return train


def make_graph_replayer(step, warmup_steps=3):
    """Return run(): the first `warmup_steps` calls run `step` eagerly, the next captures it as a
    CUDA graph and replays it, and every later call only replays."""
    graph, stream, calls = torch.cuda.CUDAGraph(), torch.cuda.Stream(), 0

    def run():
        nonlocal calls
        calls += 1
        if calls > warmup_steps + 1:
            return graph.replay()
        # A few real steps run eagerly first (on a side stream, as PyTorch's CUDA-graph notes advise)
        # so that lazy state such as Adam's moments exists; then one capture, which records kernels
        # without running them: replay it.
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            if calls <= warmup_steps:
                step()
            else:
                with torch.cuda.graph(graph, stream=stream):
                    step()
                graph.replay()
        torch.cuda.current_stream().wait_stream(stream)

    return run
