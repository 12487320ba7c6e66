"""Step 7 on paper that is not blank: how often the model reads a digit on a real-looking page.

Digits of two sources: the first 500 MNIST test digits, scaled up 4 to 6 times, and 500 digits
drawn here from strokes (three styles of each digit, slanted and jittered, a pen from a marker down
to a fine pen). They are written as ink on five kinds of page and read back through read_image,
prepare_photo and predict, the way --predict reads a file:

    clean      black ink on white paper, PNG (the control)
    ruled      blue ink on a notebook page: light blue lines 28 px apart and a red margin line, PNG
    shadow     dark ink on paper lit unevenly, a soft shadow's edge across the page, JPEG quality 75
    fine pen   the same strokes thinned to about 3 px (drawn: a 2-4 px pen) on a 640x480 page, PNG
    hard shadow  under one lamp, the sharp shadow of a phone or a hand: a straight edge at any
               angle, blurred 1-3 px, the paper in it 25-45% darker, JPEG quality 75

and, with no digit at all, pages that must be refused or answered unsure:

    blank hard shadow   a hard shadow's edge and nothing else
    blank ruled         a notebook page's lines and margin
    blank frame         a dark frame around white paper, as a page photographed on a dark table

Run: python bench/step7_pages.py --data-dir ./data --load model.pth [--count 500]
        [--source mnist|strokes|both] [--first 0] [--seed 0]

Misreads at 90% or more are counted, and of them those whose digit reads on the clean page (the
page itself caused them). --first and --seed draw other digits and other pages: held out from the
ones rules were tuned on.
"""

import argparse
import math
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
    if kind.endswith("ruled"):
        paper[:, 20::28, :] = torch.tensor([0.65, 0.8, 0.95])[:, None, None]  # light blue lines
        paper[:, :, 40:42] = torch.tensor([0.9, 0.4, 0.4])[:, None, None]  # the red margin
        colour = torch.tensor([0.1, 0.15, 0.6])  # blue ink
    if kind.endswith("hard shadow"):
        paper = paper * lamp_and_hard_shadow(height, width, g)[None]
    if kind == "blank frame":
        band = int(torch.randint(4, 20, (), generator=g))
        paper = torch.full_like(paper, 0.15)  # the dark table
        paper[:, band:-band, band:-band] = 1
    if kind == "shadow":
        rows = torch.linspace(0, 1, height)[:, None]
        cols = torch.linspace(0, 1, width)[None, :]
        light = 0.95 - 0.25 * cols  # a gradient across the page
        edge = torch.rand((), generator=g) * 0.6 + 0.2
        shadow = torch.sigmoid((rows + 0.5 * cols - edge - 0.3) / 0.03)  # a soft edge, diagonal
        paper = paper * (light - 0.35 * shadow)[None]
    # A blank page has no digit, and draws no place for one.
    if not kind.startswith("blank"):
        top = int(torch.randint(0, height - ink.shape[0] + 1, (), generator=g))
        left = int(
            torch.randint(50 if kind == "ruled" else 0, width - ink.shape[1] + 1, (), generator=g)
        )
        region = paper[:, top : top + ink.shape[0], left : left + ink.shape[1]]
        paper[:, top : top + ink.shape[0], left : left + ink.shape[1]] = (
            region * (1 - ink) + colour[:, None, None] * ink
        )
    return paper.clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0)


def hard_shadow(height, width, angle, depth, blur=2, through=(0.5, 0.5)):
    """How much light falls on a page [H, W] under the sharp shadow of a phone or a hand: a
    straight edge through `through` (fractions of the height and width) at `angle` (radians),
    blurred `blur` px, the paper beyond it `depth` darker."""
    rows = torch.arange(height)[:, None].float() - through[0] * height
    cols = torch.arange(width)[None, :].float() - through[1] * width
    beyond = cols * math.cos(angle) + rows * math.sin(angle)
    # A blur of sigma s px across the edge is close to a logistic of scale s / 1.7.
    return 1 - depth * torch.sigmoid(beyond / (blur / 1.7))


def uniform(low, high, g):
    """A number drawn evenly between `low` and `high` with the generator `g`."""
    return low + (high - low) * torch.rand((), generator=g).item()


def lamp_and_hard_shadow(height, width, g):
    """The light on a page [H, W] under one lamp, falling off across it, with a hard shadow at a
    drawn angle, blur (1-3 px) and depth (25-45%)."""
    rows = torch.arange(height)[:, None].float()
    cols = torch.arange(width)[None, :].float()
    lamp = (uniform(0, width, g), uniform(0, height, g))
    falloff = ((cols - lamp[0]) ** 2 + (rows - lamp[1]) ** 2).sqrt() / max(height, width)
    light = 1 - uniform(0.05, 0.2, g) * falloff
    angle = uniform(0, 2 * math.pi, g)
    through = (uniform(0.2, 0.8, g), uniform(0.2, 0.8, g))
    depth = uniform(0.25, 0.45, g)
    blur = uniform(1, 3, g)
    return light * hard_shadow(height, width, angle, depth, blur, through)


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
    width = uniform(0.5, 0.85, g) * height
    slant = uniform(-0.1, 0.3, g)
    jitter = 0.03 * height
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


def pictures(sources, count, first, seed, data_dir, folder):
    """(source, kind, label, picture) for `count` digits of each source on every kind of page, and
    `count` blank pages of each kind (source "blank", label None), as files read back."""
    test = datasets.MNIST(data_dir, train=False)
    g = torch.Generator().manual_seed(seed)
    # Kinds added later draw from a stream of their own: the older kinds' pages stay as they were.
    later = torch.Generator().manual_seed(seed + 1)
    for source in sources:
        for i in range(first, first + count):
            label = int(test.targets[i]) if source == "mnist" else i % 10
            scale = 4 + 2 * torch.rand((), generator=g).item()
            pen = torch.rand((), generator=g).item() if source == "strokes" else 0
            for kind in KINDS:
                stream = g
                if kind not in FIRST_KINDS:
                    stream = later
                fine = kind == "fine pen"
                if source == "mnist":
                    ink = ink_of(test.data[i], 10 if fine else scale, thin=4 if fine else 0)
                else:
                    # A marker (a fifth of the height) down to a fine pen (3% of it); on the
                    # fine-pen page, 2-4 px.
                    height = round(40 * scale if fine else 20 * scale)
                    ink = drawn_ink(
                        label, height, 2 + 2 * pen if fine else height * (0.03 + 0.17 * pen), stream
                    )
                yield source, kind, label, read_back(page(kind, ink, stream), kind, folder)
    for _ in range(count):
        # As large as a digit's page would be.
        size = round(28 * (4 + 2 * torch.rand((), generator=later).item()))
        for kind in BLANKS:
            blank = page(kind, torch.zeros(size, size), later)
            yield "blank", kind, None, read_back(blank, kind, folder)


def read_back(pixels, kind, folder):
    """`pixels` (uint8 [H, W, 3]) written as a file, JPEG for the shadows, and read as --predict
    reads it."""
    path = os.path.join(folder, "page.png")
    options = {}
    if "shadow" in kind:
        path = os.path.join(folder, "page.jpg")
        options = {"quality": 75}
    Image.fromarray(pixels.numpy(), "RGB").save(path, **options)
    return mt.read_image(path)


FIRST_KINDS = ["clean", "ruled", "shadow", "fine pen"]
KINDS = FIRST_KINDS + ["hard shadow"]
BLANKS = ["blank hard shadow", "blank ruled", "blank frame"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="./data")
    parser.add_argument("--load", default="model.pth")
    parser.add_argument("--count", type=int, default=500, help="digits of each source")
    parser.add_argument("--source", choices=["mnist", "strokes", "both"], default="both")
    parser.add_argument("--first", type=int, default=0, help="the first MNIST test digit used")
    parser.add_argument("--seed", type=int, default=0, help="draws the pages")
    args = parser.parse_args(argv)
    model = mt.load(mt.build_model(), args.load)
    sources = ["mnist", "strokes"] if args.source == "both" else [args.source]
    # Each page's (label, answer, confidence); answer None: refused (no ink, only a frame).
    answers = {}
    with tempfile.TemporaryDirectory() as folder:
        found = pictures(sources, args.count, args.first, args.seed, args.data_dir, folder)
        for source, kind, label, picture in found:
            answer = None
            confidence = 0.0
            try:
                probabilities = mt.predict(model, mt.prepare_photo(picture)[None])[0]
                answer = int(probabilities.argmax())
                confidence = float(probabilities.max())
            except ValueError:
                pass
            answers.setdefault((source, kind), []).append((label, answer, confidence))
    print(
        f"step 7 on pages: {args.count} digits of each source (from test digit {args.first}), "
        f"seed {args.seed}, model {args.load}, torch {torch.__version__}"
    )
    counts = "misread at 90%+ | of them, read on clean paper | misread, not unsure"
    print("| page | " + " | ".join(sources) + " | all | " + counts + " |")
    print("|---|" + "---:|" * (len(sources) + 4))
    for kind in KINDS + ["all"]:
        kinds = [kind]
        if kind == "all":
            kinds = KINDS
        cells = []
        every = []
        # The same digit on the clean page, beside each page.
        clean = []
        for source in sources:
            pages = [a for k in kinds for a in answers[source, k]]
            every += pages
            clean += answers[source, "clean"] * len(kinds)
            cells.append(f"{100 * sum(a[0] == a[1] for a in pages) / len(pages):.1f}%")
        cells.append(f"{100 * sum(a[0] == a[1] for a in every) / len(every):.1f}%")
        wrong = [a for a in every if a[1] is not None and a[1] != a[0]]
        # Beside each misread at 90%+, the same digit on clean paper: if that reads, the page
        # itself caused the misread.
        beside = [c for a, c in zip(every, clean) if a[1] != a[0] and a[2] >= 0.9]
        cells.append(str(len(beside)))
        cells.append(str(sum(c[0] == c[1] for c in beside)))
        cells.append(str(sum(a[2] >= mt.UNSURE_BELOW for a in wrong)))
        print(f"| {kind} | " + " | ".join(cells) + " |")
    print()
    print("| blank page | refused | unsure | refused or unsure | most confident answer |")
    print("|---|---:|---:|---:|---:|")
    for kind in BLANKS:
        pages = answers["blank", kind]
        refused = sum(a[1] is None for a in pages)
        unsure = sum(a[1] is not None and a[2] < mt.UNSURE_BELOW for a in pages)
        both = 100 * (refused + unsure) / len(pages)
        top = max(a[2] for a in pages)
        print(f"| {kind} | {refused} | {unsure} | {both:.1f}% | {100 * top:.1f}% |")
    return answers


if __name__ == "__main__":
    main()
