"""Segmenting new images with a trained interpreter or a train-deeplab checkpoint: the inputs (files, folders,
globs), one output folder per kind of output, the journal a stopped run resumes from, predictions.csv and the
--suggest pick of the most uncertain images. `ddpm-seg predict` runs it; its help describes the outputs.
"""

import csv
import glob
import heapq
import json
import os
import time
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
from PIL import Image

from .data import IMAGE_EXTENSIONS, is_hidden, list_images, read_image
from .deeplab import DeepLabSegmenter
from .device import resolve_device
from .files import append_line, atomic_path, atomic_save_npy, check_writable, folder_lock
from .fingerprint import file_sha256, files_sha256, path_sha256
from .interpreter import Interpreter, member_path
from .progress import progress_bar
from .visualize import heatmap, save_contact_sheet, save_mask_png, save_segmentation_picture

SUGGEST_THUMBNAIL = 128  # pixels, the longer side of a contact-sheet thumbnail
JOURNAL_NAME = ".predict_journal.jsonl"


@dataclass(frozen=True)
class PredictOptions:
    """What predict segments, with which model, and what it writes: predict's flags, typed, with their defaults."""
    inputs: Tuple[str, ...]  # image files, folders (searched recursively) or globs
    out_dir: str  # the output folder
    run_dir: Optional[str] = None  # a train-interpreter run folder (this or deeplab)
    deeplab: Optional[str] = None  # a train-deeplab checkpoint (this or run_dir)
    exp: Optional[str] = None  # with deeplab: its experiment config (None: the experiment.json beside it)
    model_path: Optional[str] = None  # with run_dir: the backbone checkpoint (None: the one the run recorded)
    device: str = "auto"  # auto | cpu | cuda[:i]
    batch_size: int = 1  # images segmented per call
    mask_format: str = "png"  # png | npy | both: how masks are written
    overlay: bool = True  # write overlays/<stem>.png
    uncertainty: bool = False  # write uncertainty/<stem>.png and .npy
    suggest: int = 0  # write suggest.txt and suggest.png of this many most uncertain images (0: none)


def glob_base(pattern: str) -> str:
    """The folder part of a glob before its first wildcard: outputs mirror the matches' paths below it."""
    parts = []
    for part in os.path.normpath(pattern).split(os.sep):
        if glob.has_magic(part):
            break
        parts.append(part)
    return os.sep.join(parts) if parts else "."


def collect_inputs(patterns, out_dir) -> list:
    """[(image path, output stem relative to --out)] in input order. A folder gives its images (as
    list_images: jpg/png, no hidden files) except those under --out, a glob its matching images, a file
    itself whatever its name. A path matching nothing is an error, as is a file or glob match inside --out
    (its outputs could overwrite it) and two inputs that would write the same outputs."""
    out_dir = os.path.realpath(out_dir) + os.sep
    found = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found += [(p, os.path.relpath(p, pattern)) for p in list_images(pattern)
                      if not os.path.realpath(p).startswith(out_dir)]
            continue
        if os.path.isfile(pattern):
            matches = [(pattern, os.path.basename(pattern))]
        elif glob.has_magic(pattern):
            base = glob_base(pattern)
            matches, hits = [], sorted(glob.glob(pattern, recursive=True))
            for match in hits:
                rel = os.path.relpath(match, base)
                if os.path.isdir(match):
                    found += [(p, os.path.relpath(p, base)) for p in list_images(match)]
                elif match.lower().endswith(IMAGE_EXTENSIONS) and not any(is_hidden(p) for p in rel.split(os.sep)):
                    matches.append((match, rel))
            if not matches and not any(os.path.isdir(m) for m in hits):
                raise FileNotFoundError(f"--input {pattern!r}: the glob matches no image ({', '.join(IMAGE_EXTENSIONS)})")
        else:
            raise FileNotFoundError(f"--input {pattern!r}: no such file or folder, and no glob")
        inside = [path for path, _ in matches if os.path.realpath(path).startswith(out_dir)]
        if inside:
            raise ValueError(f"--input {inside[0]!r} lies inside --out {out_dir[:-1]!r}, where its outputs could "
                             "overwrite it; choose another --out")
        found += matches
    inputs, owner = [], {}
    for path, rel in found:
        stem = os.path.splitext(rel)[0]
        if stem in owner:
            if os.path.samefile(owner[stem], path):
                continue  # the same image named twice
            raise ValueError(f"--input: {owner[stem]!r} and {path!r} would both be written as masks/{stem}.png "
                             "under --out; rename one of them or write them to separate --out folders")
        owner[stem] = path
        inputs.append((path, stem))
    if not inputs:
        raise FileNotFoundError(f"--input {list(patterns)}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    return inputs


def output_files(opts: PredictOptions) -> list:
    """(folder, extension) of every file predict writes of each input: one folder per kind of output."""
    files = {"png": [("masks", ".png")], "npy": [("masks", ".npy")],
             "both": [("masks", ".png"), ("masks", ".npy")]}[opts.mask_format]
    files += [("overlays", ".png")] if opts.overlay else []
    return files + ([("uncertainty", ".npy"), ("uncertainty", ".png")] if opts.uncertainty else [])


def output_path(out, kind, stem, extension) -> str:
    return os.path.join(out, kind, stem + extension)


def write_outputs(opts: PredictOptions, stem, image, labels, unc, segmenter) -> None:
    out = opts.out_dir
    if opts.mask_format in ("png", "both"):
        save_mask_png(output_path(out, "masks", stem, ".png"), labels, segmenter.palette)
    if opts.mask_format in ("npy", "both"):
        atomic_save_npy(output_path(out, "masks", stem, ".npy"), labels)
    if opts.overlay:  # with the uncertainty panel under --uncertainty; one colour scale for every image
        save_segmentation_picture(output_path(out, "overlays", stem, ".png"), image, labels, segmenter.palette,
                                  segmenter.class_names, uncertainty=unc if opts.uncertainty else None,
                                  uncertainty_max=segmenter.uncertainty_max)
    if opts.uncertainty:
        atomic_save_npy(output_path(out, "uncertainty", stem, ".npy"), unc)
        with atomic_path(output_path(out, "uncertainty", stem, ".png")) as tmp:
            Image.fromarray(heatmap(unc, segmenter.uncertainty_max)).save(tmp, format="PNG")


def thumbnail(array, resample):
    picture = Image.fromarray(array)
    picture.thumbnail((SUGGEST_THUMBNAIL, SUGGEST_THUMBNAIL), resample)
    return np.asarray(picture)


def write_csv(path, rows, class_names) -> None:
    # surrogateescape: a file name that is not valid UTF-8 is written as its own bytes, so it names the file.
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "width", "height", "uncertainty_score"] + list(class_names))
        for row in rows:
            writer.writerow([row["image"], row["width"], row["height"], repr(row["score"])]
                            + [f"{share:.6f}" for share in row["shares"]])


def input_stamp(path) -> list:
    """What an input's outputs depend on: its size, modification time and content."""
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns, file_sha256(path)]


def run_header(opts: PredictOptions, segmenter) -> dict:
    """What the outputs depend on: the model by content (DeepLab checkpoint, or the members and the backbone
    checkpoint), its config and the output options."""
    if opts.deeplab:
        model = {"deeplab_sha256": file_sha256(opts.deeplab)}
    else:
        members = [member_path(opts.run_dir, m) for m in range(segmenter.cfg.model_num)]
        model = {"members_sha256": files_sha256(members),
                 "model_sha256": path_sha256(segmenter.cfg.model_path)}
    return {"model": model, "config": segmenter.cfg.to_dict(), "format": opts.mask_format, "overlay": opts.overlay,
            "uncertainty": opts.uncertainty}


def read_journal(path, header) -> dict:
    """{(image path, stem): row} of a journal written with the same header; {} when there is none or it
    belongs to another model or options. A last line cut short by a kill is ignored."""
    try:
        with open(path) as f:
            lines = f.read().split("\n")
    except FileNotFoundError:
        return {}
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    if not records or records[0] != json.loads(json.dumps(header)):
        return {}
    return {(r["image"], r["stem"]): r for r in records[1:]}


def outputs_present(opts: PredictOptions, stem) -> bool:
    return all(os.path.isfile(output_path(opts.out_dir, kind, stem, ext)) for kind, ext in output_files(opts))


def read_labels(opts: PredictOptions, stem) -> np.ndarray:
    """The class ids an earlier run wrote for `stem` (its .npy, or the palette PNG's indices)."""
    if opts.mask_format in ("npy", "both"):
        return np.load(output_path(opts.out_dir, "masks", stem, ".npy"))
    with Image.open(output_path(opts.out_dir, "masks", stem, ".png")) as mask:
        return np.asarray(mask)


def predict(opts: PredictOptions) -> dict:
    """Segment every input (see segment_inputs), holding a lock on the output folder."""
    if opts.batch_size < 1 or opts.suggest < 0:
        raise ValueError(f"--batch_size must be >= 1 and --suggest >= 0, got {opts.batch_size}, {opts.suggest}")
    if opts.exp and not opts.deeplab:
        raise ValueError("--exp goes with --deeplab; a --run_dir holds its own config")
    if opts.model_path and not opts.run_dir:
        raise ValueError("--model_path goes with --run_dir (the DDPM backbone); a DeepLab needs none")
    check_writable(opts.out_dir)
    inputs = collect_inputs(opts.inputs, opts.out_dir)
    if opts.deeplab:
        segmenter = DeepLabSegmenter.load(opts.deeplab, opts.exp, resolve_device(opts.device))
    else:
        # One backbone forward per batch of inputs.
        segmenter = Interpreter.load(opts.run_dir, opts.model_path, opts.device, extract_batch=opts.batch_size)
    os.makedirs(opts.out_dir, exist_ok=True)  # only once the inputs and the model are known to be good
    with folder_lock(opts.out_dir, "predict"):
        return segment_inputs(opts, inputs, segmenter)


def segment_inputs(opts: PredictOptions, inputs, segmenter) -> dict:
    """Segment every input; returns {"rows": per image (input order), "failed": [(path, reason)],
    "suggested": [paths], "seconds", "images_per_s"}."""
    journal_path, header = os.path.join(opts.out_dir, JOURNAL_NAME), run_header(opts, segmenter)
    done = read_journal(journal_path, header)
    if not done:
        with atomic_path(journal_path) as tmp, open(tmp, "w") as f:
            f.write(json.dumps(header) + "\n")
    rows = {}
    for i, (path, stem) in enumerate(inputs):
        row = done.get((path, stem))
        if row and outputs_present(opts, stem) and row.get("input") == input_stamp(path):
            rows[i] = row
    todo = [(i, path, stem) for i, (path, stem) in enumerate(inputs) if i not in rows]
    if rows:
        print(f"{len(rows)} of {len(inputs)} images were segmented by an earlier run with this model and options "
              f"(listed in {journal_path}); segmenting the other {len(todo)}")
    failed = []
    start = time.time()
    bar = progress_bar(total=len(todo), unit="img", desc="predict")
    for begin in range(0, len(todo), opts.batch_size):
        batch = []
        for i, path, stem in todo[begin:begin + opts.batch_size]:
            try:
                batch.append((i, path, stem, read_image(path)))
            except ValueError as e:
                failed.append((path, str(e)))
                bar.write(f"skipped {path}: {e}")
                bar.update(1)
        results = segmenter.segment([image for _, _, _, image in batch]) if batch else []
        for (i, path, stem, image), (labels, unc, score) in zip(batch, results):
            stamp = input_stamp(path)  # before the outputs: an image replaced meanwhile is done again next time
            write_outputs(opts, stem, image, labels, unc, segmenter)
            shares = np.bincount(labels.ravel(), minlength=segmenter.number_class)[:segmenter.number_class]
            rows[i] = {"image": path, "stem": stem, "input": stamp, "width": image.shape[1],
                       "height": image.shape[0], "score": score, "shares": (shares / labels.size).tolist()}
            # Written after the image's outputs: a listed image is complete.
            append_line(journal_path, json.dumps(rows[i]))
            bar.update(1)
    bar.close()
    seconds = time.time() - start
    segmented = len(todo) - len(failed)
    rows = [rows[i] for i in sorted(rows)]  # input order
    top = []  # heap of the --suggest most uncertain: (score, -index, path, image, labels thumbnails)
    for i, row in enumerate(rows if opts.suggest else []):
        entry = (row["score"], -i, row["image"])
        if len(top) < opts.suggest or entry[:2] > top[0][:2]:
            entry += (thumbnail(read_image(row["image"]), Image.BILINEAR),
                      thumbnail(read_labels(opts, row["stem"]), Image.NEAREST))
            (heapq.heappush if len(top) < opts.suggest else heapq.heappushpop)(top, entry)
    write_csv(os.path.join(opts.out_dir, "predictions.csv"), rows, segmenter.class_names)
    suggested = sorted(top, reverse=True)  # highest score first; among equal scores, input order
    if opts.suggest:
        with atomic_path(os.path.join(opts.out_dir, "suggest.txt")) as tmp, \
                open(tmp, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.writelines(path + "\n" for _, _, path, _, _ in suggested)
        save_contact_sheet(os.path.join(opts.out_dir, "suggest.png"),
                           [(f"{i + 1}. {score:.4f} {os.path.basename(path)}", image, labels)
                            for i, (score, _, path, image, labels) in enumerate(suggested)],
                           segmenter.palette, segmenter.class_names, side=SUGGEST_THUMBNAIL)
    rate = segmented / seconds if segmented and seconds > 0 else None
    print(f"{segmented} images segmented in {seconds:.1f} s" + (f": {rate:.3f} images/s" if rate else "")
          + f"; outputs in {opts.out_dir}")
    for path, reason in failed:
        print(f"failed: {path}: {reason}")
    return {"rows": rows, "failed": failed, "suggested": [path for _, _, path, _, _ in suggested],
            "seconds": seconds, "images_per_s": rate}
