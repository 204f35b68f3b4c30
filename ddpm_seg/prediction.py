"""Segmenting new images with a trained interpreter, a distilled student (PyTorch or ONNX) or a train-deeplab
checkpoint: the inputs (files, folders,
globs), one output folder per kind of output, the journals a stopped run resumes from, predictions.csv and the
--suggest pick of the most uncertain images, in one process or shared over the ranks of a torchrun job.
`ddpm-seg predict` runs it; its help describes the outputs.
"""

import contextlib
import csv
import glob
import heapq
import json
import os
import re
import time
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch.distributed as dist
from PIL import Image

from .data import IMAGE_EXTENSIONS, is_hidden, list_images, read_image
from .deeplab import STUDENT_NAME, NetworkSegmenter, is_student_folder
from .device import distributed
from .files import append_line, atomic_path, atomic_save_npy, check_writable, folder_lock
from .fingerprint import file_sha256, files_sha256, path_sha256
from .interpreter import Interpreter, member_path
from .onnx_export import OnnxSegmenter
from .progress import progress_bar
from .visualize import heatmap, save_contact_sheet, save_mask_png, save_segmentation_picture

SUGGEST_THUMBNAIL = 128  # pixels, the longer side of a contact-sheet thumbnail
JOURNAL_NAME = ".predict_journal.jsonl"  # rank 0's (and a one-process run's); rank r > 0: .predict_journal.<r>.jsonl
JOURNAL_PATTERN = re.compile(r"\.predict_journal(\.\d+)?\.jsonl")


@dataclass(frozen=True)
class PredictOptions:
    """What predict segments, with which model, and what it writes: predict's flags, typed, with their defaults."""
    inputs: Tuple[str, ...]  # image files, folders (searched recursively) or globs
    out_dir: str  # the output folder
    run_dir: Optional[str] = None  # a train-interpreter run folder or a distill student folder (or deeplab, onnx)
    deeplab: Optional[str] = None  # a train-deeplab checkpoint
    onnx: Optional[str] = None  # a student exported by `ddpm-seg export`
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
    """What the outputs depend on: the model by content (a DeepLab, ONNX or student file, or an interpreter's
    members and backbone checkpoint), its config and the output options."""
    if opts.deeplab:
        model = {"deeplab_sha256": file_sha256(opts.deeplab)}
    elif opts.onnx:
        model = {"onnx_sha256": file_sha256(opts.onnx)}
    elif is_student_folder(opts.run_dir):
        model = {"student_sha256": file_sha256(os.path.join(opts.run_dir, STUDENT_NAME))}
    else:
        members = [member_path(opts.run_dir, m) for m in range(segmenter.cfg.model_num)]
        model = {"members_sha256": files_sha256(members),
                 "model_sha256": path_sha256(segmenter.cfg.model_path)}
    return {"model": model, "config": segmenter.cfg.to_dict(), "format": opts.mask_format, "overlay": opts.overlay,
            "uncertainty": opts.uncertainty}


def journal_path(out_dir, rank) -> str:
    """Rank 0 keeps the journal a one-process run writes; every other rank its own, so no two processes append to
    one file."""
    return os.path.join(out_dir, JOURNAL_NAME if rank == 0 else f".predict_journal.{rank}.jsonl")


def journal_paths(out_dir) -> list:
    """Every journal in --out: this run's ranks' and those an earlier run with more processes left."""
    return sorted(os.path.join(out_dir, name) for name in os.listdir(out_dir) if JOURNAL_PATTERN.fullmatch(name))


def read_journal(path, header) -> Optional[dict]:
    """{(image path, stem): [rows]} of a journal written with the same header; None when there is none or it
    belongs to another model or options. A last line cut short by a kill is ignored."""
    try:
        with open(path) as f:
            lines = f.read().split("\n")
    except FileNotFoundError:
        return None
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    if not records or records[0] != json.loads(json.dumps(header)):
        return None
    rows = {}
    for r in records[1:]:
        rows.setdefault((r["image"], r["stem"]), []).append(r)
    return rows


def earlier_row(opts: PredictOptions, rows, path, stem) -> Optional[dict]:
    """Of the journal rows of an input, the one of the input as it is now (same size, modification time and
    content), when all its outputs are still there; else None."""
    if not rows or not outputs_present(opts, stem):
        return None
    stamp = input_stamp(path)
    return next((row for row in rows if row.get("input") == stamp), None)


def start_journals(opts: PredictOptions, header, rank, world_size) -> dict:
    """Read every journal of this header in --out and make sure this rank's has the header; returns
    {(image path, stem): [rows]} of them all."""
    own = journal_path(opts.out_dir, rank)
    if rank == 0 and read_journal(own, header) is None:
        # Its journal has another header or none: so had the last run here, which may have overwritten outputs
        # that other ranks' journals of a run before it still list. Rank 0's journal gets this header only after
        # the barrier, so a run killed in between clears what is left the next time.
        for path in journal_paths(opts.out_dir):
            os.remove(path)
    if world_size > 1:
        dist.barrier()  # the others start once rank 0 holds the folder lock and has cleared another run's journals
    journals = {path: read_journal(path, header) for path in journal_paths(opts.out_dir)}
    if journals.get(own) is None:
        with atomic_path(own) as tmp, open(tmp, "w") as f:
            f.write(json.dumps(header) + "\n")
    done = {}
    for rows in journals.values():
        for key, listed in (rows or {}).items():
            done.setdefault(key, []).extend(listed)
    return done


def outputs_present(opts: PredictOptions, stem) -> bool:
    return all(os.path.isfile(output_path(opts.out_dir, kind, stem, ext)) for kind, ext in output_files(opts))


def read_labels(opts: PredictOptions, stem) -> np.ndarray:
    """The class ids an earlier run wrote for `stem` (its .npy, or the palette PNG's indices)."""
    if opts.mask_format in ("npy", "both"):
        return np.load(output_path(opts.out_dir, "masks", stem, ".npy"))
    with Image.open(output_path(opts.out_dir, "masks", stem, ".png")) as mask:
        return np.asarray(mask)


def load_segmenter(opts: PredictOptions, device):
    """The model of --deeplab, --onnx or --run_dir (a student folder or an interpreter's run folder), on `device`."""
    if opts.deeplab:
        return NetworkSegmenter.load_deeplab(opts.deeplab, opts.exp, device)
    if opts.onnx:
        return OnnxSegmenter.load(opts.onnx)
    if is_student_folder(opts.run_dir):
        return NetworkSegmenter.load_student(opts.run_dir, device)
    # One backbone forward per batch of inputs.
    return Interpreter.load(opts.run_dir, opts.model_path, device, extract_batch=opts.batch_size)


def predict(opts: PredictOptions) -> dict:
    """Segment every input (see segment_inputs), in one process or as one rank of a torchrun job; rank 0 holds
    a lock on the output folder."""
    if opts.batch_size < 1 or opts.suggest < 0:
        raise ValueError(f"--batch_size must be >= 1 and --suggest >= 0, got {opts.batch_size}, {opts.suggest}")
    if opts.exp and not opts.deeplab:
        raise ValueError("--exp goes with --deeplab; a --run_dir holds its own config")
    if opts.model_path and (not opts.run_dir or is_student_folder(opts.run_dir)):
        raise ValueError("--model_path goes with an interpreter's --run_dir (its backbone); a student or DeepLab "
                         "needs none")
    check_writable(opts.out_dir)
    inputs = collect_inputs(opts.inputs, opts.out_dir)
    with distributed(opts.device) as (rank, world_size, device):
        segmenter = load_segmenter(opts, device)
        os.makedirs(opts.out_dir, exist_ok=True)  # only once the inputs and the model are known to be good
        with folder_lock(opts.out_dir, "predict") if rank == 0 else contextlib.nullcontext():
            return segment_inputs(opts, inputs, segmenter, rank, world_size)


def gathered(obj, world_size) -> list:
    """`obj` of every rank, in rank order."""
    if world_size == 1:
        return [obj]
    objs = [None] * world_size
    dist.all_gather_object(objs, obj)
    return objs


def segment_inputs(opts: PredictOptions, inputs, segmenter, rank=0, world_size=1) -> dict:
    """Segment every input not done already (see start_journals), as rank `rank` of `world_size` processes:
    input i is this rank's when i % world_size == rank. Returns on every rank {"rows": per image segmented, now
    or before (input order), "failed": [(path, reason)] of all ranks, "suggested": [paths], "seconds",
    "images_per_s" (None on ranks other than 0)}; rank 0 alone writes predictions.csv and the --suggest files,
    and prints the summary."""
    if world_size > 1:
        # Every rank collected the inputs itself: a folder that grew meanwhile could have given them other lists.
        shared = [inputs]
        dist.broadcast_object_list(shared, src=0)
        inputs = shared[0]
    header = run_header(opts, segmenter)
    journal = journal_path(opts.out_dir, rank)
    done = start_journals(opts, header, rank, world_size)
    rows, todo = {}, []
    for i in range(rank, len(inputs), world_size):
        path, stem = inputs[i]
        row = earlier_row(opts, done.get((path, stem)), path, stem)
        if row:
            rows[i] = row
        else:
            todo.append((i, path, stem))
    earlier = sum(gathered(len(rows), world_size))
    if earlier and rank == 0:
        journals = journal_paths(opts.out_dir)
        listed = journals[0] if len(journals) == 1 else os.path.join(opts.out_dir, ".predict_journal*.jsonl")
        print(f"{earlier} of {len(inputs)} images were segmented by an earlier run with this model and options "
              f"(listed in {listed}); segmenting the other {len(inputs) - earlier}")
    failed = []  # (input index, path, reason)
    start = time.time()
    bar = progress_bar(total=len(todo), unit="img", desc="predict (rank 0)" if world_size > 1 else "predict",
                       disable=rank != 0)
    for begin in range(0, len(todo), opts.batch_size):
        batch = []
        for i, path, stem in todo[begin:begin + opts.batch_size]:
            try:
                batch.append((i, path, stem, read_image(path)))
            except ValueError as e:
                failed.append((i, path, str(e)))
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
            append_line(journal, json.dumps(rows[i]))
            bar.update(1)
    bar.close()
    # The rows travel with the failures, so no rank reads the others' journals again (nor hashes their inputs).
    parts = gathered((rows, failed, len(todo)), world_size)
    seconds = time.time() - start
    rows = {i: row for part, _, _ in parts for i, row in part.items()}
    rows = [rows[i] for i in sorted(rows)]  # input order
    failed = sorted(entry for _, part, _ in parts for entry in part)
    segmented = sum(count for _, _, count in parts) - len(failed)
    # The --suggest most uncertain, highest score first; among equal scores, input order.
    top = heapq.nlargest(opts.suggest, range(len(rows)), key=lambda k: (rows[k]["score"], -k))
    suggested = [rows[k] for k in top]
    rate = segmented / seconds if segmented and seconds > 0 else None
    if rank == 0:
        write_csv(os.path.join(opts.out_dir, "predictions.csv"), rows, segmenter.class_names)
        if opts.suggest:
            write_suggestions(opts, suggested, segmenter)
        print(f"{segmented} images segmented in {seconds:.1f} s" + (f": {rate:.3f} images/s" if rate else "")
              + (f" over {world_size} processes" if world_size > 1 else "") + f"; outputs in {opts.out_dir}")
        for _, path, reason in failed:
            print(f"failed: {path}: {reason}")
    if world_size > 1:
        # The others return with rank 0: torchrun stops every process as soon as one has exited with a failure
        # (an unreadable input), which would cut rank 0's writes short.
        dist.barrier()
    return {"rows": rows, "failed": [(path, reason) for _, path, reason in failed],
            "suggested": [row["image"] for row in suggested], "seconds": seconds,
            "images_per_s": rate if rank == 0 else None}


def write_suggestions(opts: PredictOptions, suggested, segmenter) -> None:
    """suggest.txt, the images' paths, and suggest.png, their contact sheet, of the rows `suggested`."""
    with atomic_path(os.path.join(opts.out_dir, "suggest.txt")) as tmp, \
            open(tmp, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.writelines(row["image"] + "\n" for row in suggested)
    save_contact_sheet(os.path.join(opts.out_dir, "suggest.png"),
                       [(f"{n + 1}. {row['score']:.4f} {os.path.basename(row['image'])}",
                         thumbnail(read_image(row["image"]), Image.BILINEAR),
                         thumbnail(read_labels(opts, row["stem"]), Image.NEAREST))
                        for n, row in enumerate(suggested)],
                       segmenter.palette, segmenter.class_names, side=SUGGEST_THUMBNAIL)
