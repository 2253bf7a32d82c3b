"""Raw fundus photographs -> square crops of the eye, the images the training data expects.

    python data/prepare.py SRC_DIR DST_DIR [--size 512] [--ben-graham] [--labels trainLabels.csv]

Each photo (any size; the eye a bright disc on a dark background, often clipped at the top and
bottom by the frame, as in Kaggle EyePACS) becomes DST_DIR/images/<name>.jpeg: the eye's bounding
square, padded with black where the frame cut the eye off, resized to size x size. With --labels,
DST_DIR also gets the lab layout (train_img.csv, train_label.csv, test_img.csv, test_label.csv),
split by patient. Photos that are not gradable fundus photographs (fundus.assess: a quality score under
--min-quality; too dark, overexposed, not a colour photo, not a fundus photo, low contrast, out of focus)
stay out of images/ and are listed with the reason and score in DST_DIR/ungradable.csv (--keep-ungradable
crops them too). Re-runnable:
finished images are skipped, so an interrupted run just resumes.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

import pandas as pd
from tqdm import tqdm

try:
    import fundus
except ModuleNotFoundError:  # run with a Python that has the requirements but not the repo installed
    sys.exit("data/prepare.py: error: the repo's modules are not importable with this Python; run `make` (or "
             "`pip install -e .`) in the repo folder, or run `python -m data.prepare` from it")
from dataloader import LAB_FILES, default_workers, patient_split, read_labels_table  # noqa: E402
from fundus import FAILED, KEPT, UNGRADABLE, WRITTEN  # noqa: E402
from layouts import image_stem  # noqa: E402
from runtime import (Parser, UserError, atomic_write, exit_on_user_error, input_file, input_folder,  # noqa: E402
                     map_in_processes, remove_leftovers, write_text_atomic)

FAILURES_FILE = "prepare_failures.txt"
UNGRADABLE_FILE = "ungradable.csv"
OPTIONS_FILE = "prepare_options.json"
SHOWN_FAILURES = 20


# --------------------------------------------------------------------------- one photo
def prepare_pair(paths: tuple[Path, Path], size: int, ben_graham: bool, quality: int, keep_ungradable: bool,
                 min_quality: float | None) -> tuple[Path, str, str, float | None]:
    return (paths[0], *fundus.prepare_photo(paths[0], paths[1], size, ben_graham, quality, keep_ungradable,
                                            min_quality))


# --------------------------------------------------------------------------- the folder
def list_photos(src_dir: Path) -> list[Path]:
    """The image files directly in src_dir, sorted; one sentence when there are none or names clash."""
    input_folder("SRC_DIR", src_dir)
    photos = fundus.image_files(src_dir)
    if not photos:
        raise UserError(f"SRC_DIR {src_dir} holds no {'/'.join(fundus.IMAGE_EXTENSIONS)} files "
                        "(subfolders are not searched)")
    stems: dict[str, Path] = {}
    for photo in photos:
        if photo.stem in stems:
            raise UserError(f"{stems[photo.stem].name} and {photo.name} in {src_dir} would both become "
                            f"{photo.stem}.jpeg; keep one of them")
        stems[photo.stem] = photo
    return photos


def check_options(dst_dir: Path, size: int, ben_graham: bool) -> None:
    """All crops in DST_DIR are made alike: a rerun with another --size or --ben-graham would skip
    the existing crops and silently mix two kinds of image, so it stops instead."""
    wanted, record = {"size": size, "ben_graham": ben_graham}, dst_dir / OPTIONS_FILE
    if not record.is_file():
        write_text_atomic(record, json.dumps(wanted) + "\n")
        return
    try:
        made = json.loads(record.read_text())
    except json.JSONDecodeError:
        made = None
    if not isinstance(made, dict):
        raise UserError(f"{record} is not the JSON object prepare.py writes; delete it if all crops in "
                        f"{dst_dir} were made with {as_flags(wanted)}")
    if made != wanted:
        raise UserError(f"{dst_dir} holds crops made with {as_flags(made)}, not {as_flags(wanted)}; "
                        "rerun with those options or choose another DST_DIR")


def as_flags(options: dict) -> str:
    return f"--size {options.get('size')}" + (" --ben-graham" if options.get("ben_graham") else "")


def pending(photos: list[Path], out_dir: Path) -> tuple[list[tuple[Path, Path]], int]:
    """(source, output) pairs still to do, and how many are done already (one listing, no stat each)."""
    remove_leftovers(out_dir)  # temporary files of a run killed mid-write
    done = {entry.name for entry in os.scandir(out_dir)}
    todo = [(p, out_dir / f"{p.stem}.jpeg") for p in photos if f"{p.stem}.jpeg" not in done]
    return todo, len(photos) - len(todo)


def run_all(todo: list[tuple[Path, Path]], args: argparse.Namespace) -> dict[str, dict[Path, tuple]]:
    """Crop every pair on args.workers processes: {WRITTEN, KEPT, UNGRADABLE, FAILED: {photo: (reason,
    quality score)}}."""
    work = functools.partial(prepare_pair, size=args.size, ben_graham=args.ben_graham, quality=args.quality,
                             keep_ungradable=args.keep_ungradable, min_quality=args.min_quality)
    bar = tqdm(total=len(todo), unit="img", disable=not sys.stderr.isatty())
    outcomes = {WRITTEN: {}, KEPT: {}, UNGRADABLE: {}, FAILED: {}}
    # chunks of 4: a photo takes 50-150 ms, so handing them out costs nothing, and the last
    # chunks finish together instead of one worker holding a long tail
    for src, outcome, reason, score in map_in_processes(work, todo, args.workers, chunksize=4):
        outcomes[outcome][src] = (reason, score)
        bar.update()
    bar.close()
    return outcomes


def report(outcomes: dict[str, dict[Path, tuple]], skipped: int, dst_dir: Path) -> None:
    """The summary line; ungradable photos listed in DST_DIR/ungradable.csv (path,reason,quality: the
    check's score), failures (the first few shown) in DST_DIR/prepare_failures.txt. Lists of an earlier run
    are replaced."""
    ungradable = {**outcomes[UNGRADABLE], **outcomes[KEPT]}
    failures = outcomes[FAILED]
    print(f"prepare: {len(outcomes[WRITTEN]) + len(outcomes[KEPT])} written, {skipped} skipped (already done), "
          f"{len(ungradable)} ungradable" + (f" ({len(outcomes[KEPT])} kept with --keep-ungradable)"
                                             if outcomes[KEPT] else "")
          + f", {len(failures)} failed -> {dst_dir / 'images'}")
    for listing in (dst_dir / UNGRADABLE_FILE, dst_dir / FAILURES_FILE):
        listing.unlink(missing_ok=True)
    if ungradable:
        rows = pd.DataFrame({"path": [str(p) for p in sorted(ungradable)],
                             "reason": [ungradable[p][0] for p in sorted(ungradable)],
                             "quality": [ungradable[p][1] for p in sorted(ungradable)]})
        write_text_atomic(dst_dir / UNGRADABLE_FILE, rows.to_csv(index=False, float_format="%.4f"))
        print(f"  {len(ungradable)} ungradable photos are listed with the reason in {dst_dir / UNGRADABLE_FILE}"
              + ("" if outcomes[KEPT] else "; --keep-ungradable crops them too"))
    if not failures:
        return
    lines = [f"{p.name}: {failures[p][0]}" for p in sorted(failures)]
    write_text_atomic(dst_dir / FAILURES_FILE, "\n".join(lines) + "\n")
    for line in lines[:SHOWN_FAILURES]:
        print(f"  failed: {line}", file=sys.stderr)
    if len(lines) > SHOWN_FAILURES:
        print(f"  and {len(lines) - SHOWN_FAILURES} more", file=sys.stderr)
    print(f"  all {len(lines)} failures are listed in {dst_dir / FAILURES_FILE}", file=sys.stderr)


# --------------------------------------------------------------------------- labels -> lab layout
def write_lab_layout(table, photos: list[Path], out_dir: Path, dst_dir: Path, fraction: float, seed: int) -> None:
    """The four header-less lab CSVs for the rows whose crop exists, split by patient."""
    names = [image_stem(n) for n in table["name"]]
    done = {entry.name[:-len(".jpeg")] for entry in os.scandir(out_dir) if entry.name.endswith(".jpeg")}
    keep = [i for i, n in enumerate(names) if n in done]
    if len(keep) < len(names):
        in_src = {p.stem for p in photos}
        absent = sum(n not in in_src for n in names)
        print(f"labels: dropped {len(names) - len(keep)} of {len(names)} rows: {absent} with no photo in "
              f"SRC_DIR, {len(names) - len(keep) - absent} whose photo is ungradable or failed (see "
              f"{UNGRADABLE_FILE}, {FAILURES_FILE})")
    if not keep:
        raise UserError("no row of the labels table names a prepared image; do its names match SRC_DIR's files?")
    names, grades = [names[i] for i in keep], table["grade"].to_numpy()[keep]
    splits = dict(zip(LAB_FILES, patient_split(names, fraction, seed)))
    for split, index in splits.items():
        img_csv, label_csv = LAB_FILES[split]
        write_text_atomic(dst_dir / img_csv, "".join(f"{names[i]}\n" for i in index))
        write_text_atomic(dst_dir / label_csv, "".join(f"{int(grades[i])}\n" for i in index))
    print(f"labels: {len(splits['train'])} train and {len(splits['test'])} test images, split by patient, "
          f"in {dst_dir}/{{train,test}}_{{img,label}}.csv")


# --------------------------------------------------------------------------- command line
def parse_args(argv=None) -> argparse.Namespace:
    parser = Parser(description="Crop raw fundus photographs to square images of the eye.")
    parser.add_argument("src_dir", type=Path, metavar="SRC_DIR",
                        help=f"folder of photos ({', '.join(fundus.IMAGE_EXTENSIONS)}, any case); subfolders are not searched")
    parser.add_argument("dst_dir", type=Path, metavar="DST_DIR",
                        help="output root: crops go to DST_DIR/images/<name>.jpeg, existing ones are skipped")
    crops = parser.add_argument_group("crops")
    crops.add_argument("--size", type=int, default=512, help="side of the square crops in pixels (default 512)")
    crops.add_argument("--ben-graham", action="store_true",
                       help="subtract the local average colour (Ben Graham, Kaggle 2015) (default off)")
    crops.add_argument("--quality", type=int, default=95, help="JPEG quality 1-100 (default 95)")
    crops.add_argument("--keep-ungradable", action="store_true",
                       help="also crop photos the quality check calls ungradable (they are listed either way)")
    crops.add_argument("--min-quality", type=float, default=None, metavar="SCORE",
                       help="the quality check's operating point: photos scoring under it (0-1) are ungradable "
                            f"(default {fundus.quality_model()['min_quality']:.3f}, the lowest score of the gradable "
                            "photos of DrimDB and EyeQ it was fitted on; 0 refuses only what is no fundus photo or "
                            "shows nothing)")
    crops.add_argument("--workers", type=int, default=default_workers(),
                       help="processes (default: one per CPU core, here %(default)s)")
    labels = parser.add_argument_group("labels")
    labels.add_argument("--labels", type=Path, metavar="CSV",
                        help="EyePACS trainLabels.csv (image,level) or APTOS train.csv (id_code,diagnosis): "
                             "also write the lab layout's four CSVs into DST_DIR (default none)")
    labels.add_argument("--test-fraction", type=float, default=0.2,
                        help="share of patients in the test split (default 0.2)")
    labels.add_argument("--seed", type=int, default=0, help="seed of the patient split (default 0)")
    args = parser.parse_args(argv)
    if args.size < 32:
        raise UserError(f"--size {args.size} is too small: choose 32 or more (512 is usual)")
    if args.min_quality is not None and not 0 <= args.min_quality <= 1:
        raise UserError(f"--min-quality {args.min_quality} must lie between 0 and 1")
    if not 1 <= args.quality <= 100:
        raise UserError(f"--quality {args.quality} must lie between 1 and 100")
    if args.workers < 1:
        raise UserError(f"--workers {args.workers} must be at least 1")
    if args.labels is not None and not 0 < args.test_fraction < 1:
        raise UserError(f"--test-fraction {args.test_fraction} must lie between 0 and 1")
    return args


def read_labels(path: Path | None, photos: list[Path]):
    """The --labels table, refused when no name in it matches a photo (the wrong table or SRC_DIR)."""
    if path is None:
        return None
    table = read_labels_table(input_file("--labels", path))
    names = [image_stem(n) for n in table["name"]]
    stems = {p.stem for p in photos}
    if not stems.intersection(names):
        raise UserError(f"none of the {len(names)} names in --labels {path} (first: {', '.join(names[:3])}) "
                        f"matches a photo in SRC_DIR (first: {', '.join(sorted(stems)[:3])})")
    return table


@exit_on_user_error
def main(argv=None) -> int:
    args = parse_args(argv)
    photos = list_photos(args.src_dir)
    table = read_labels(args.labels, photos)  # before the crops: a bad table should not wait hours to fail
    out_dir = args.dst_dir / "images"
    out_dir.mkdir(parents=True, exist_ok=True)
    check_options(args.dst_dir, args.size, args.ben_graham)
    todo, skipped = pending(photos, out_dir)
    outcomes = run_all(todo, args)
    report(outcomes, skipped, args.dst_dir)
    if table is not None:
        write_lab_layout(table, photos, out_dir, args.dst_dir, args.test_fraction, args.seed)
    return 1 if outcomes[FAILED] else 0


if __name__ == "__main__":
    sys.exit(main())
