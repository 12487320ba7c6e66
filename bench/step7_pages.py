"""Step 7 on paper that is not blank: how often the model reads a digit written on a real-looking page.

The first 500 MNIST test digits, scaled up 4 to 6 times, are written as ink on four kinds of page
and read back through read_image, prepare_digit and predict, the way --predict reads a file:

    clean      black ink on white paper, PNG (the control)
    ruled      blue ink on a notebook page: light blue lines 28 px apart and a red margin line, PNG
    shadow     dark ink on paper lit unevenly, a soft shadow's edge crossing the page, JPEG (quality 75)
    fine pen   the same strokes thinned to about 3 px on a 640x480 page, PNG

Run: python bench/step7_pages.py --data-dir ./data --load model.pth [--count 500]
"""

import argparse
import os
import sys
import tempfile

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import datasets

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import mnist_train as mt  # noqa: E402


def ink_of(digit, scale, thin=0):
    """The digit as ink in [0, 1], `scale` times larger; `thin` px eroded off each side of every stroke."""
    size = round(28 * scale)
    ink = F.interpolate(digit.float()[None, None] / 255, size=(size, size), mode="bilinear")[0, 0].clamp(0, 1)
    for _ in range(thin):  # erosion: each pixel takes its darkest neighbour's ink
        ink = -F.max_pool2d(-ink[None, None], 3, stride=1, padding=1)[0, 0]
    return ink


def page(kind, ink, g):
    """An RGB uint8 [H, W, 3] page of `kind` with `ink` written on it somewhere."""
    height, width = (480, 640) if kind == "fine pen" else (ink.shape[0] + 120, ink.shape[1] + 160)
    paper = torch.ones(3, height, width)
    colour = torch.tensor([0.05, 0.05, 0.05])
    if kind == "ruled":
        paper[:, 20::28, :] = torch.tensor([0.65, 0.8, 0.95])[:, None, None]  # light blue lines
        paper[:, :, 40:42] = torch.tensor([0.9, 0.4, 0.4])[:, None, None]  # the red margin
        colour = torch.tensor([0.1, 0.15, 0.6])  # blue ink
    if kind == "shadow":
        rows = torch.linspace(0, 1, height)[:, None]
        cols = torch.linspace(0, 1, width)[None, :]
        light = 0.95 - 0.25 * cols  # a gradient across the page
        edge = torch.rand((), generator=g) * 0.6 + 0.2
        shadow = torch.sigmoid((rows + 0.5 * cols - edge - 0.3) / 0.03)  # a soft edge, diagonal
        paper = paper * (light - 0.35 * shadow)[None]
    top = int(torch.randint(0, height - ink.shape[0] + 1, (), generator=g))
    left = int(torch.randint(50 if kind == "ruled" else 0, width - ink.shape[1] + 1, (), generator=g))
    region = paper[:, top : top + ink.shape[0], left : left + ink.shape[1]]
    paper[:, top : top + ink.shape[0], left : left + ink.shape[1]] = region * (1 - ink) + colour[:, None, None] * ink
    return paper.clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="./data")
    parser.add_argument("--load", default="model.pth")
    parser.add_argument("--count", type=int, default=500)
    args = parser.parse_args(argv)
    model = mt.load(mt.build_model(), args.load)
    test = datasets.MNIST(args.data_dir, train=False)
    g = torch.Generator().manual_seed(0)
    kinds = ["clean", "ruled", "shadow", "fine pen"]
    correct = dict.fromkeys(kinds, 0)
    with tempfile.TemporaryDirectory() as folder:
        for digit, label in zip(test.data[: args.count], test.targets[: args.count].tolist()):
            scale = 4 + 2 * torch.rand((), generator=g).item()
            for kind in kinds:
                ink = ink_of(digit, 10 if kind == "fine pen" else scale, thin=4 if kind == "fine pen" else 0)
                path = os.path.join(folder, "page.jpg" if kind == "shadow" else "page.png")
                Image.fromarray(page(kind, ink, g).numpy(), "RGB").save(path, **({"quality": 75} if kind == "shadow" else {}))
                try:
                    x = mt.prepare_digit(mt.read_image(path))
                    correct[kind] += int(mt.predict(model, x[None]).argmax()) == label
                except ValueError:  # no ink found: a miss
                    pass
    print(f"step 7 on pages: {args.count} MNIST test digits, model {args.load}, torch {torch.__version__}")
    print("| page | read correctly |")
    print("|---|---:|")
    for kind in kinds:
        print(f"| {kind} | {100 * correct[kind] / args.count:.1f}% |")
    return correct


if __name__ == "__main__":
    main()
