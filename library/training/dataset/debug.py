"""``--debug_dataset``: show what the model will be trained on, then stop.

For every item of one epoch it prints the image key, bucket, resize and crop, whether it was
flipped, the caption after all processing and its input ids (new Textual Inversion tokens show
as ids >= 49408). It never waits for a key press (kohya opens an OpenCV window per image and
waits), goes through the epoch once, and writes PNG contact sheets of the augmented crops with
their captions to the output folder, so one can look instead of read.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from library.files import save_image
from library.text.encoding import tokenize_prompts

THUMB = 192  # longest side of a thumbnail in the contact sheet
COLUMNS = 4
PER_SHEET = 48
CAPTION_LINES = 5
CAPTION_CHARS = 32


def run_debug_dataset(dataset, output_dir: Path, max_items: int | None = None) -> list[Path]:
    """Print and draw up to ``max_items`` items of the current epoch; returns the sheet paths."""
    epoch = dataset.epoch
    plan = dataset.batches_for_epoch(epoch)
    total = sum(len(batch.records) for batch in plan)
    limit = total if max_items is None else min(total, max_items)
    print(f"debug_dataset: epoch {epoch}, {len(plan)} batches, {total} items (showing {limit})", flush=True)
    tiles: list[tuple[np.ndarray, np.ndarray | None, str]] = []
    shown = 0
    for batch_index, batch in enumerate(plan):
        if shown >= limit:
            break
        for position, record_index in enumerate(batch.records):
            if shown >= limit:
                break
            record = dataset.records[record_index]
            item = dataset.build_item(record, epoch, batch_index, position, use_cache=False, keep_pixels=True)
            ids = tokenize_prompts(dataset.tokenizer, [item.caption], dataset.max_token_length)[0]
            shown += 1
            print(_describe(shown, limit, batch_index, position, record, item), flush=True)
            print(f"  input ids: {format_input_ids(ids, dataset.tokenizer)}", flush=True)
            mask = None if item.mask is None else item.mask[0].numpy()
            tiles.append(
                (
                    item.pixels,
                    mask,
                    f"{shown}. {record.path.name} {item.bucket[0]}x{item.bucket[1]}\n{item.caption}",
                )
            )
    paths = write_contact_sheets(tiles, output_dir)
    for path in paths:
        print(f"contact sheet: {path}", flush=True)
    return paths


def format_input_ids(ids, tokenizer) -> str:
    """``tensor([[49406, 49408, 49409, 1929, 49407, ...]])``: each 77-id chunk up to its end token.

    The padding after the end token is elided; new Textual Inversion tokens are the ids >= 49408.
    """
    end, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    chunks = []
    for chunk in ids.tolist():
        shown = chunk
        for position in range(1, len(chunk)):
            if chunk[position] in (end, pad) and all(c in (end, pad) for c in chunk[position:]):
                shown = chunk[: position + 1]
                break
        rest = ", ..." if len(shown) < len(chunk) else ""
        chunks.append("[" + ", ".join(str(i) for i in shown) + rest + "]")
    return "tensor([" + ", ".join(chunks) + "])"


def _describe(number: int, total: int, batch_index: int, position: int, record, item) -> str:
    crop = "face crop " if record.face is not None and record.subset.face_crop_aug_range else ""
    return (
        f"[{number}/{total}] batch {batch_index} item {position}: {record.key}\n"
        f"  bucket: {item.bucket[0]}x{item.bucket[1]}  original: {record.size[0]}x{record.size[1]}  "
        f"resized: {item.resized[0]}x{item.resized[1]}  {crop}crop (l,t,r,b): {item.crop}  "
        f"flipped: {item.flipped}  loss weight: {item.loss_weight}{'  (reg)' if record.is_reg else ''}\n"
        f'  caption: "{item.caption}"'
    )


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the bitmap font
        return ImageFont.load_default()


def _thumbnail(pixels: np.ndarray, mask: np.ndarray | None) -> Image.Image:
    image = Image.fromarray(pixels)
    if mask is not None:
        # grey out what the loss mask ignores, so masks can be checked by eye
        weight = Image.fromarray((np.clip(mask, 0, 1) * 255).astype(np.uint8)).resize(
            image.size, Image.Resampling.NEAREST
        )
        grey = Image.new("RGB", image.size, (128, 128, 128))
        image = Image.composite(image, Image.blend(image, grey, 0.7), weight)
    scale = THUMB / max(image.size)  # enlarge small crops too, so they can be inspected
    size = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
    return image.resize(size, Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.NEAREST)


def write_contact_sheets(
    tiles: list[tuple[np.ndarray, np.ndarray | None, str]], output_dir: Path
) -> list[Path]:
    """Grid(s) of thumbnails with captions: ``debug_dataset_000.png`` ... in ``output_dir``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    font = _font(11)
    line_height = 13
    text_height = line_height * (CAPTION_LINES + 1) + 4
    paths = []
    for sheet_number, start in enumerate(range(0, len(tiles), PER_SHEET)):
        chunk = tiles[start : start + PER_SHEET]
        rows = math.ceil(len(chunk) / COLUMNS)
        columns = min(COLUMNS, len(chunk))
        cell_w, cell_h = THUMB + 8, THUMB + text_height + 8
        sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), (255, 255, 255))
        draw = ImageDraw.Draw(sheet)
        for index, (pixels, mask, label) in enumerate(chunk):
            x, y = (index % COLUMNS) * cell_w + 4, (index // COLUMNS) * cell_h + 4
            thumb = _thumbnail(pixels, mask)
            sheet.paste(thumb, (x, y))
            title, _, caption = label.partition("\n")
            lines = [title[:CAPTION_CHARS]] + textwrap.wrap(caption, CAPTION_CHARS)[:CAPTION_LINES]
            for line_number, line in enumerate(lines):
                draw.text((x, y + THUMB + 2 + line_number * line_height), line, fill=(0, 0, 0), font=font)
        path = output_dir / f"debug_dataset_{sheet_number:03d}.png"
        save_image(sheet, path)
        paths.append(path)
    return paths
