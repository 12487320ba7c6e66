"""Step 7 on paper that is not blank: how often the model reads a digit on a real-looking page.

Digits of two sources: the first 500 MNIST test digits, scaled up 4 to 6 times, and 500 digits
drawn here from strokes (three styles of each digit, slanted and jittered, a pen from a marker down
to a fine pen). They are written as ink on four kinds of page and read back through read_image,
prepare_photo and predict, the way --predict reads a file:

    clean      black ink on white paper, PNG (the control)
    ruled      blue ink on a notebook page: light blue lines 28 px apart and a red margin line, PNG
    shadow     dark ink on paper lit unevenly, a soft shadow's edge across the page, JPEG quality 75
    fine pen   the same strokes thinned to about 3 px (drawn: a 2-4 px pen) on a 640x480 page, PNG

Run: python bench/step7_pages.py --data-dir ./data --load model.pth [--count 500]
        [--source mnist|strokes|both]
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
    """The digit as ink in [0, 1], `scale` times larger; `thin` px eroded off each side of every
    stroke."""
    size = round(28 * scale)
    ink = F.interpolate(digit.float()[None, None] / 255, size=(size, size), mode="bilinear")[
        0, 0
    ].clamp(0, 1)
    for _ in range(thin):  # erosion: each pixel takes its darkest neighbour's ink
        ink = -F.max_pool2d(-ink[None, None], 3, stride=1, padding=1)[0, 0]
    return ink


def page(kind, ink, g, margin=60):
    """An RGB uint8 [H, W, 3] page of `kind` with `ink` written on it somewhere: 2 * `margin` px
    taller than it."""
    height, width = (
        (480, 640)
        if kind == "fine pen"
        else (ink.shape[0] + 2 * margin, ink.shape[1] + 2 * margin + 40)
    )
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
    left = int(
        torch.randint(50 if kind == "ruled" else 0, width - ink.shape[1] + 1, (), generator=g)
    )
    region = paper[:, top : top + ink.shape[0], left : left + ink.shape[1]]
    paper[:, top : top + ink.shape[0], left : left + ink.shape[1]] = (
        region * (1 - ink) + colour[:, None, None] * ink
    )
    return paper.clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0)


# Digits drawn from strokes in a unit box (x right, y down): polylines and arcs of ellipses
# (degrees, 0 = right, 90 = down). Three styles each: a 1 with or without flag and foot, a 7 with
# or without bar, an open or closed 4.
def arc(cx, cy, rx, ry, a0, a1):
    """Points along an ellipse's arc from angle a0 to a1."""
    t = torch.linspace(a0, a1, max(3, abs(a1 - a0) // 12)) * torch.pi / 180
    return list(zip((cx + rx * t.cos()).tolist(), (cy + ry * t.sin()).tolist()))


def strokes(digit, style):
    """The strokes (lists of (x, y) points) of `digit` in `style` 0, 1 or 2."""
    s = style
    shapes = {
        0: [arc(0.5, 0.5, 0.42 - 0.08 * s, 0.5, -90, 270)],
        1: [[(0.5, 0), (0.5, 1)]]
        if s == 0
        else [[(0.25, 0.22), (0.5, 0), (0.5, 1)]] + [[(0.25, 1), (0.75, 1)]] * (s == 2),
        2: [arc(0.5, 0.28, 0.4, 0.28, 190 - 20 * s, 380) + [(0.05, 1), (0.95, 1)]],
        3: [arc(0.5, 0.25, 0.4, 0.25, 200, 450) + arc(0.5, 0.75, 0.42, 0.25, 270, 515)]
        if s < 2
        else [[(0.1, 0), (0.9, 0), (0.42, 0.42)] + arc(0.5, 0.7, 0.42, 0.3, 255, 515)],
        4: [[(0.7, 0), (0.05, 0.68), (0.95, 0.68)], [(0.7, 0), (0.7, 1)]]
        if s < 2
        else [[(0.2, 0), (0.1, 0.6), (0.95, 0.6)], [(0.75, 0.2), (0.75, 1)]],
        5: [[(0.85, 0), (0.22, 0)] + arc(0.5, 0.68, 0.4, 0.32, 232 - 10 * s, 510)],
        6: [arc(0.75, 0.7, 0.63, 0.7, 260, 180) + arc(0.5, 0.7, 0.38, 0.3, 180, 540)],
        7: [[(0.05, 0.15)] * (s == 2) + [(0.05, 0), (0.95, 0), (0.4, 1)]]
        + [[(0.3, 0.5), (0.85, 0.5)]] * (s == 1),
        8: [arc(0.5, 0.25, 0.32, 0.25, 90, 450), arc(0.5, 0.74, 0.4, 0.26, -90, 270)],
        9: [arc(0.5, 0.3, 0.4, 0.3, 0, 360) + [(0.9, 0.3), (0.85 - 0.2 * (s == 2), 1)]],
    }
    return shapes[digit]


def drawn_ink(digit, height, pen, g):
    """Ink in [0, 1] of `digit` drawn `height` px tall with a `pen` px wide pen: random style,
    slant, width, jitter."""
    r = lambda a, b: a + (b - a) * torch.rand((), generator=g).item()  # noqa: E731
    width, slant, jitter = r(0.5, 0.85) * height, r(-0.1, 0.3), 0.03 * height
    segments = []
    for line in strokes(digit, int(torch.randint(3, (), generator=g))):
        p = torch.tensor(line) * torch.tensor([width, height])
        p += jitter * torch.randn(2, generator=g) + jitter / 4 * torch.randn(
            p.shape, generator=g
        )  # moved, wobbly
        p[:, 0] += slant * (height - p[:, 1]) + 0.1 * height  # leaning right as it rises
        p += pen + 3 * jitter  # all of it on the canvas
        segments.append(torch.stack([p[:-1], p[1:]], 1))
    a, b = torch.cat(segments).unbind(1)  # [S, 2] each: every segment's ends
    size = (
        round(height + 2 * pen + 6 * jitter),
        round(width + 0.55 * height + 2 * pen + 6 * jitter),
    )
    pixels = torch.stack(
        torch.meshgrid(torch.arange(size[1]), torch.arange(size[0]), indexing="xy"), -1
    )
    pixels = pixels.view(
        -1, 1, 2
    )  # each pixel's distance to the nearest segment: projected onto each, clamped
    t = (((pixels - a) * (b - a)).sum(-1) / ((b - a) ** 2).sum(-1).clamp(min=1e-6)).clamp(0, 1)
    distance = (pixels - a - t[..., None] * (b - a)).norm(dim=-1).min(1).values.view(size)
    return cropped(
        (pen / 2 + 0.5 - distance).clamp(0, 1)
    )  # anti-aliased: a pixel half-covered is half ink


def cropped(ink):
    """`ink` cut to the bounding box of its nonzero pixels."""
    rows, cols = ink.any(1).nonzero()[:, 0], ink.any(0).nonzero()[:, 0]
    return ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def pictures(sources, count, data_dir, folder):
    """(source, kind, label, picture) for `count` digits of each source on every kind of page, as
    files read back."""
    test = datasets.MNIST(data_dir, train=False)
    g = torch.Generator().manual_seed(0)
    for source in sources:
        for i in range(count):
            label = int(test.targets[i]) if source == "mnist" else i % 10
            scale = 4 + 2 * torch.rand((), generator=g).item()
            pen = torch.rand((), generator=g).item() if source == "strokes" else 0
            for kind in KINDS:
                fine = kind == "fine pen"
                if source == "mnist":
                    ink = ink_of(test.data[i], 10 if fine else scale, thin=4 if fine else 0)
                else:
                    # A marker (a fifth of the height) down to a fine pen (3% of it); on the
                    # fine-pen page, 2-4 px.
                    height = round(40 * scale if fine else 20 * scale)
                    ink = drawn_ink(
                        label, height, 2 + 2 * pen if fine else height * (0.03 + 0.17 * pen), g
                    )
                path = os.path.join(folder, "page.jpg" if kind == "shadow" else "page.png")
                options = {"quality": 75} if kind == "shadow" else {}
                Image.fromarray(page(kind, ink, g).numpy(), "RGB").save(path, **options)
                yield source, kind, label, mt.read_image(path)


KINDS = ["clean", "ruled", "shadow", "fine pen"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="./data")
    parser.add_argument("--load", default="model.pth")
    parser.add_argument("--count", type=int, default=500, help="digits of each source")
    parser.add_argument("--source", choices=["mnist", "strokes", "both"], default="both")
    args = parser.parse_args(argv)
    model = mt.load(mt.build_model(), args.load)
    sources = ["mnist", "strokes"] if args.source == "both" else [args.source]
    correct = {(s, k): 0 for s in sources for k in KINDS}
    with tempfile.TemporaryDirectory() as folder:
        for source, kind, label, picture in pictures(sources, args.count, args.data_dir, folder):
            try:
                correct[source, kind] += (
                    int(mt.predict(model, mt.prepare_photo(picture)[None]).argmax()) == label
                )
            except ValueError:  # no ink found: a miss
                pass
    print(
        f"step 7 on pages: {args.count} digits of each source, model {args.load}, "
        f"torch {torch.__version__}"
    )
    print("| page | " + " | ".join(sources) + (" | all |" if len(sources) > 1 else " |"))
    print("|---|" + "---:|" * (len(sources) + (len(sources) > 1)))
    for kind in KINDS + ["all"]:
        hits = [sum(correct[s, k] for k in (KINDS if kind == "all" else [kind])) for s in sources]
        n = args.count * (len(KINDS) if kind == "all" else 1)
        cells = [f"{100 * h / n:.1f}%" for h in hits] + [
            f"{100 * sum(hits) / n / len(sources):.1f}%"
        ] * (len(hits) > 1)
        print(f"| {kind} | " + " | ".join(cells) + " |")
    return correct


if __name__ == "__main__":
    main()
