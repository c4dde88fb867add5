"""A synthetic world: named objects on named background textures, with masks and captions.

It stands in for PASCAL VOC where no real data can be downloaded. Each foreground class has
consistent appearance cues, as real objects do: a colour range, a surface pattern and a shape
together (a shape in a random colour alone is not learnable by a tiny CLIP in minutes). No
class colour resembles a background texture, so that objects do not blend into backgrounds.

Every image shows 1-3 distinct classes at random size, position and rotation on one background;
later objects occlude earlier ones and the mask records what stays visible. The folder holds

    classes.json, manifest.csv   the data contract of ``weclip.dataset``
    captions.csv                 image_id, caption, background (for CLIP pretraining)
    images/<split>/<id>.png      RGB, image_size x image_size
    masks/<split>/<id>.png       0 background, c = classes[c - 1]

Splits: 'pretrain' (CLIP pretraining only), 'train' and 'val'. Each image is drawn from its own
generator seeded by (seed, split, index), so a split does not change when another one's size does.
"""
from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from weclip.contract import ClassInfo, Record, write_dataset
from weclip.files import write_atomically

SPLITS = ("pretrain", "train", "val")

# Foreground classes: (name, colour adjective used in captions).
CLASSES = (
    ("apple", "red"),
    ("lemon", "yellow"),
    ("starfish", "orange"),
    ("tyre", "black"),
    ("kite", "pink"),
    ("dice", "white"),
    ("flower", "purple"),
    ("rock", "grey"),
)

# Background textures: (word, phrases placing objects on it). The bare word also appears in
# captions ('a photo of grass with ...') so that prompts built from it are understood.
BACKGROUNDS = (
    ("grass", ("on grass", "on the grass", "lying in the grass")),
    ("sand", ("on sand", "on the sand", "lying on the beach sand")),
    ("water", ("on water", "floating on the water", "on the water")),
    ("brick wall", ("in front of a brick wall", "against a brick wall")),
    ("sky", ("in the sky", "against the sky", "against a blue sky")),
    ("wood", ("on wood", "on a wooden table", "on wooden planks")),
)

# Templates without the background teach the text tower prompts such as 'a photo of an apple.'.
CAPTION_TEMPLATES = (
    "a photo of {objects}.",
    "a photo of {objects} {where}.",
    "{objects} {where}.",
    "an image of {objects} {where}.",
    "a photo of {background} with {objects}.",
)

# An object whose visible part is smaller than this fraction of the image is dropped.
MIN_VISIBLE_FRACTION = 0.01


@dataclass
class Scene:
    """One drawn image: image uint8 [S, S, 3], mask uint8 [S, S], labels (class ids, sorted)."""

    image: np.ndarray
    mask: np.ndarray
    labels: list[int]
    background: str
    caption: str


def class_info() -> ClassInfo:
    """The world's classes, their prompts and background words."""
    return ClassInfo(
        name="world",
        classes=[name for name, _ in CLASSES],
        # Filled into a template such as 'a photo of {}.' (docs/method.md, section 2), like the background words.
        prompts=[_article(name) for name, _ in CLASSES],
        background=[word for word, _ in BACKGROUNDS],
    )


def _article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Value noise in [0, 1], float32 [size, size]: a random (cells+1)^2 lattice, bilinear."""
    lattice = Image.fromarray(rng.random((cells + 1, cells + 1), dtype=np.float32), mode="F")
    return np.asarray(lattice.resize((size, size), Image.BILINEAR))


def _background(rng: np.random.Generator, kind: int, size: int) -> np.ndarray:
    """A texture of BACKGROUNDS[kind], float32 [size, size, 3] on the 0-255 scale."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    fine = rng.standard_normal((size, size), dtype=np.float32)
    word = BACKGROUNDS[kind][0]
    if word == "grass":
        # Vertical blades: noise stretched along y, on a patchy green.
        blades = np.repeat(rng.standard_normal((size // 4, size), dtype=np.float32), 4, axis=0)
        shade = 0.75 + 0.35 * _smooth_noise(rng, size, 4) + 0.12 * blades + 0.05 * fine
        base = rng.uniform((50, 120, 30), (90, 165, 60))
    elif word == "sand":
        ripples = np.sin(2 * np.pi * (rng.uniform(4, 8) * y + 0.6 * _smooth_noise(rng, size, 3)))
        shade = 0.95 + 0.04 * ripples + 0.08 * _smooth_noise(rng, size, 6) + 0.06 * fine
        base = rng.uniform((200, 175, 125), (230, 200, 155))
    elif word == "water":
        waves = np.sin(2 * np.pi * (rng.uniform(6, 10) * y + 0.3 * np.sin(2 * np.pi * 3 * x)
                                    + 0.8 * _smooth_noise(rng, size, 3)))
        shade = 0.85 + 0.15 * waves + 0.04 * fine
        base = rng.uniform((25, 80, 160), (60, 120, 210))
    elif word == "brick wall":
        rows = int(rng.integers(8, 13))
        brick_w = rng.uniform(1.8, 2.6) / rows
        row = np.floor(y * rows)
        col = np.floor((x + 0.5 * brick_w * (row % 2)) / brick_w)
        # Per-brick tone from a hash of its (row, column).
        tone = np.sin(row * 12.9898 + col * 78.233) * 43758.5453 % 1.0
        mortar = ((y * rows) % 1.0 < 0.14) | (((x + 0.5 * brick_w * (row % 2)) / brick_w) % 1.0 < 0.06)
        shade = 0.85 + 0.25 * tone + 0.05 * fine
        base = rng.uniform((125, 65, 50), (155, 90, 70))  # weathered brown, unlike the red apple
        image = shade[..., None] * base
        image[mortar] = rng.uniform(175, 200) + 6 * fine[mortar, None]
        return image
    elif word == "sky":
        gradient = 0.85 + 0.2 * y
        image = gradient[..., None] * rng.uniform((110, 170, 225), (150, 200, 250)) + 2 * fine[..., None]
        # Thin bluish clouds, unlike the pure white of the dice.
        clouds = np.clip((_smooth_noise(rng, size, 5) - 0.6) * 3, 0, 0.6)[..., None]
        return (1 - clouds) * image + clouds * np.array((225, 235, 250), np.float32)
    else:  # wood
        grain = np.sin(2 * np.pi * (rng.uniform(10, 18) * x + 1.5 * _smooth_noise(rng, size, 3)))
        planks = (x * int(rng.integers(2, 5))) % 1.0 < 0.02
        shade = 0.9 + 0.12 * grain + 0.04 * fine - 0.35 * planks
        base = rng.uniform((120, 75, 35), (160, 100, 55))
    return shade[..., None] * base


def _object(rng: np.random.Generator, class_id: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Class ``class_id`` (1..C) at a random place, size and rotation.

    Returns (inside bool [size, size], appearance float32 [size, size, 3] on the 0-255 scale).
    Shape and pattern are functions of the object's own coordinates (u, v), so they turn with it.
    """
    radius = rng.uniform(0.12, 0.3) * size
    cy, cx = rng.uniform(0.15, 0.85, size=2) * size
    angle = rng.uniform(0, 2 * np.pi)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = (x - cx) / radius, (y - cy) / radius
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    rho, phi = np.hypot(u, v), np.arctan2(v, u)
    fine = rng.standard_normal((size, size), dtype=np.float32)[..., None]
    name = CLASSES[class_id - 1][0]
    if name == "apple":
        # Red disc, shaded towards the rim, with a specular highlight.
        inside = rho < 1
        colour = rng.uniform((190, 15, 20), (235, 45, 45))
        highlight = np.exp(-((u + 0.4) ** 2 + (v + 0.4) ** 2) / 0.03)[..., None]
        image = (1.1 - 0.4 * rho[..., None]) * colour + highlight * 120
    elif name == "lemon":
        # Yellow ellipse with dark speckles.
        inside = u ** 2 + (v / 0.62) ** 2 < 1
        colour = rng.uniform((230, 200, 20), (250, 230, 70))
        speckles = (rng.random((size, size)) < 0.08)[..., None]
        image = colour * (1 - 0.35 * speckles)
    elif name == "starfish":
        # Orange five-armed star with a regular grid of cream dots.
        inside = rho < 0.45 + 0.55 * np.abs(np.cos(2.5 * phi)) ** 3
        colour = rng.uniform((235, 110, 15), (255, 150, 45))
        dots = (((u * 4) % 1 - 0.5) ** 2 + ((v * 4) % 1 - 0.5) ** 2 < 0.05)[..., None]
        image = np.where(dots, np.float32(245), colour)
    elif name == "tyre":
        # Black ring (the background shows through the hole) with grey radial treads.
        inside = (rho < 1) & (rho > 0.5)
        dark = rng.uniform(20, 45)
        treads = ((np.cos(18 * phi) > 0.4) & (rho > 0.8))[..., None]
        rim = ((rho > 0.5) & (rho < 0.6))[..., None]
        image = np.where(treads, np.float32(95), np.where(rim, np.float32(170), np.float32(dark)))
        image = np.repeat(image, 3, axis=-1)
    elif name == "kite":
        # Pink diamond with two dark cross spars.
        inside = np.abs(u) / 0.65 + np.abs(v) < 1
        colour = rng.uniform((230, 70, 160), (255, 120, 210))
        spars = ((np.abs(u) < 0.05) | (np.abs(v + 0.2) < 0.05))[..., None]
        image = np.where(spars, np.float32(60), colour)
    elif name == "dice":
        # White square with black pips (faces two to six).
        inside = np.maximum(np.abs(u), np.abs(v)) < 0.72
        face = int(rng.integers(2, 7))
        pip_spots = {2: [(-1, -1), (1, 1)], 3: [(-1, -1), (0, 0), (1, 1)],
                     4: [(-1, -1), (-1, 1), (1, -1), (1, 1)],
                     5: [(-1, -1), (-1, 1), (0, 0), (1, -1), (1, 1)],
                     6: [(-1, -1), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 1)]}[face]
        pips = np.zeros((size, size), dtype=bool)
        for i, j in pip_spots:
            pips |= (u - 0.4 * i) ** 2 + (v - 0.4 * j) ** 2 < 0.13 ** 2
        image = np.where(pips[..., None], np.float32(25), np.float32(rng.uniform(230, 250)))
        image = np.repeat(image, 3, axis=-1)
    elif name == "flower":
        # Purple six-petalled flower with a yellow centre.
        inside = rho < 0.35 + 0.65 * np.abs(np.cos(3 * phi))
        colour = rng.uniform((135, 40, 180), (180, 80, 230))
        centre = (rho < 0.25)[..., None]
        image = np.where(centre, np.array((250, 200, 50), np.float32), colour * (0.8 + 0.3 * rho[..., None]))
    else:  # rock
        # Grey irregular blob (random smooth outline) with granite grain.
        harmonics = rng.uniform(-0.12, 0.12, size=(2, 4))
        k = np.arange(2, 6)[:, None, None]
        outline = 0.8 + (harmonics[0][:, None, None] * np.cos(k * phi)
                         + harmonics[1][:, None, None] * np.sin(k * phi)).sum(0)
        inside = rho < outline
        grey = rng.uniform(110, 150)
        image = np.repeat(grey * (0.9 + 0.2 * _smooth_noise(rng, size, 6))[..., None], 3, axis=-1)
        image = image + 18 * fine
    return inside, image + 5 * fine


def _caption(rng: np.random.Generator, labels: list[int], background: int) -> str:
    """E.g. 'a photo of a red apple and a tyre on grass.' (objects in random order)."""
    phrases = []
    for c in rng.permutation(labels):
        name, colour = CLASSES[c - 1]
        # The colour is left out half of the time so that the bare name matches the prompts.
        phrases.append(_article(f"{colour} {name}" if rng.random() < 0.5 else name))
    objects = _join(phrases)
    word, wheres = BACKGROUNDS[background]
    template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    return template.format(objects=objects, where=wheres[rng.integers(len(wheres))], background=word)


def describe(labels: list[int], background: str | None) -> str:
    """The plain caption of a region showing ``labels`` (class ids) and, unless None, the
    ``background`` word: 'a photo of grass with an apple and a tyre.', 'a photo of grass.',
    'a photo of an apple.' The prompts of CAM ('a photo of {}.') are such captions."""
    objects = _join([_article(CLASSES[c - 1][0]) for c in sorted(labels)])
    if background is None:
        return f"a photo of {objects}."
    return f"a photo of {background} with {objects}." if objects else f"a photo of {background}."


def _join(phrases: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return " and ".join(filter(None, [", ".join(phrases[:-1]), *phrases[-1:]]))


def draw_scene(rng: np.random.Generator, image_size: int = 128) -> Scene:
    """One random scene of 1-3 distinct classes on a random background."""
    background = int(rng.integers(len(BACKGROUNDS)))
    canvas = _background(rng, background, image_size)
    n_objects = int(rng.integers(1, 4))
    classes = rng.choice(len(CLASSES), size=n_objects, replace=False) + 1
    objects = [(int(c), *_object(rng, int(c), image_size)) for c in classes]
    # Paint in order (later occlude earlier), then repaint without the objects that stay
    # hardly visible; removing an object only uncovers the others, so one pass suffices.
    mask = np.zeros((image_size, image_size), dtype=np.uint8)
    for c, inside, _ in objects:
        mask[inside] = c
    min_area = MIN_VISIBLE_FRACTION * image_size ** 2
    objects = [o for o in objects if (mask == o[0]).sum() >= min_area]
    mask[:] = 0
    for c, inside, appearance in objects:
        canvas[inside] = appearance[inside]
        mask[inside] = c
    labels = sorted(c for c, _, _ in objects)
    image = np.clip(canvas, 0, 255).astype(np.uint8)
    return Scene(image, mask, labels, BACKGROUNDS[background][0], _caption(rng, labels, background))


def generate_world(out_dir: str | Path, *, seed: int = 0, image_size: int = 128,
                   n_pretrain: int = 10000, n_train: int = 2000, n_val: int = 500) -> Path:
    """Draw the world's three splits into ``out_dir`` and return it (see the module docstring)."""
    out_dir = Path(out_dir)
    counts = {"pretrain": n_pretrain, "train": n_train, "val": n_val}
    records, captions = [], []
    start = time.monotonic()
    for split_index, split in enumerate(SPLITS):
        if counts[split]:
            (out_dir / "images" / split).mkdir(parents=True, exist_ok=True)
            (out_dir / "masks" / split).mkdir(parents=True, exist_ok=True)
        for i in range(counts[split]):
            scene = draw_scene(np.random.default_rng([seed, split_index, i]), image_size)
            image_id = f"{split}_{i:05d}"
            image_path = out_dir / "images" / split / f"{image_id}.png"
            mask_path = out_dir / "masks" / split / f"{image_id}.png"
            # Fast compression: the files are rewritten whenever the world is regenerated.
            Image.fromarray(scene.image).save(image_path, compress_level=1)
            Image.fromarray(scene.mask).save(mask_path, compress_level=1)
            records.append(Record(image_id, image_path, mask_path, split, scene.labels))
            captions.append((image_id, scene.caption, scene.background))
            done = i + 1
            if done % 1000 == 0 or done == counts[split]:
                print(f"world: {split} {done}/{counts[split]} ({time.monotonic() - start:.0f} s)",
                      flush=True)
    _write_captions(out_dir / "captions.csv", captions)
    write_dataset(out_dir, class_info(), records)
    return out_dir


def _write_captions(path: Path, rows: list[tuple[str, str, str]]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(("image_id", "caption", "background"))
            writer.writerows(rows)

    write_atomically(path, write)


def read_captions(root: str | Path) -> dict[str, tuple[str, str]]:
    """image_id -> (caption, background word) from ``root``/captions.csv."""
    with open(Path(root) / "captions.csv", newline="") as f:
        return {row["image_id"]: (row["caption"], row["background"]) for row in csv.DictReader(f)}
