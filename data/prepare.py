"""Raw fundus photographs -> square crops of the eye, the images the training data expects.

    python data/prepare.py SRC_DIR DST_DIR [--size 512] [--ben-graham] [--labels trainLabels.csv]

Each photo (any size; the eye a bright disc on a dark background, often clipped at the top and
bottom by the frame, as in Kaggle EyePACS) becomes DST_DIR/images/<name>.jpeg: the eye's bounding
square, padded with black where the frame cut the eye off, resized to size x size. With --labels,
DST_DIR also gets the lab layout (train_img.csv, train_label.csv, test_img.csv, test_label.csv),
split by patient. Photos that are not gradable fundus photographs (fundus.assess: a quality score under
--min-quality; too dark, overexposed, not a colour photo, not a fundus photo, low contrast, out of focus)
stay out of images/ and are listed with the reason and score in DST_DIR/ungradable.csv (--keep-ungradable
crops them too). Re-runnable: finished images are skipped, so an interrupted run (Ctrl-C, SIGTERM, even
SIGKILL) just resumes. A crop counts as finished only when DST_DIR/prepared.txt lists it: a file
prepare.py did not write is never taken for a crop (a raw photo in images/ once was), and never overwritten.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import sys
from pathlib import Path

import pandas as pd
from tqdm import tqdm

try:
    import fundus
except ModuleNotFoundError:  # run with a Python that has the requirements but not the repo installed
    sys.exit("data/prepare.py: error: the repo's modules are not importable with this Python; run `make` (or "
             "`pip install -e .`) in the repo folder, or run `python -m data.prepare` from it")
from dataloader import LAB_FILES, default_workers, header_size, patient_split, read_labels_table  # noqa: E402
from fundus import FAILED, KEPT, UNGRADABLE, WRITTEN  # noqa: E402
from layouts import image_stem  # noqa: E402
from runtime import (NO_ROOM, Parser, UserError, atomic_writes, check_output, check_output_file,  # noqa: E402
                     exit_on_user_error, fraction_sentence, input_file, input_folder, map_in_processes, nothing_read,
                     remove_leftovers, write_text_atomic)

FAILURES_FILE = "prepare_failures.txt"
UNGRADABLE_FILE = "ungradable.csv"
OPTIONS_FILE = "prepare_options.json"
PREPARED_FILE = "prepared.txt"  # the crops prepare.py wrote into images/, one file name a line
CROP_SUFFIX = ".crop.tmp"  # a worker's crop, renamed into place by the main process once it is recorded
SHOWN_FAILURES = 20


# --------------------------------------------------------------------------- one photo
def prepare_pair(paths: tuple[Path, Path], size: int, ben_graham: bool, quality: int, keep_ungradable: bool,
                 min_quality: float | None, owner: int) -> tuple[Path, str, str, float | None]:
    """Crop one photo into a hidden file beside its output (see Crops.finish for why), named for the
    prepare.py process `owner` that runs the worker: (photo, outcome, reason, quality score)."""
    return (paths[0], *fundus.prepare_photo(paths[0], crop_file(paths[1], owner), size, ben_graham, quality,
                                            keep_ungradable, min_quality))


def crop_file(output: Path, owner: int | None = None) -> Path:
    # hidden, ending in .tmp and named for the prepare.py that made it (this one by default): remove_leftovers
    # clears those of a killed run, never those of another prepare.py running now
    return output.with_name(f".{output.name}.{owner or os.getpid()}{CROP_SUFFIX}")


class Crops:
    """The record of the crops prepare.py wrote (DST_DIR/prepared.txt). A crop is recorded first, then
    renamed into images/, so a kill at any instant leaves no unrecorded crop there: only a recorded name
    whose file is missing (done again) or a hidden temporary file (removed by the next run)."""

    def __init__(self, dst_dir: Path):
        self.path = dst_dir / PREPARED_FILE
        self.out_dir = dst_dir / "images"
        self.names: set[str] = set()
        if self.path.is_file():
            self.names = {line.strip() for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()}
        self.file = None

    def done(self) -> set[str]:
        """The recorded crops that are in images/ (one listing, no stat each)."""
        present = {entry.name for entry in os.scandir(self.out_dir)} if self.out_dir.is_dir() else set()
        return self.names & present

    def foreign(self, size: int) -> list[str]:
        """The files in images/ that prepare.py did not write. A folder made before the record existed
        (prepare_options.json but no prepared.txt) has its crops adopted: JPEGs of size x size pixels."""
        if not self.out_dir.is_dir():
            return []
        files = sorted(entry.name for entry in os.scandir(self.out_dir)
                       if not entry.name.startswith(".") and entry.is_file())
        if not self.path.is_file() and (self.path.parent / OPTIONS_FILE).is_file():
            adopted = [n for n in files if n.endswith(".jpeg") and header_size(self.out_dir / n) == (size, size)]
            if adopted:
                self.record(adopted)
                print(f"prepare: {len(adopted)} crops made before {PREPARED_FILE} was kept are recorded in it")
        return [n for n in files if n not in self.names]

    def record(self, names: list[str]) -> None:
        # one os.write a record: a signal handler runs between Python's steps, never inside the call, so
        # Ctrl-C cannot leave half a name that would glue itself to the next one
        if self.file is None:
            self.file = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(self.file, "".join(f"{name}\n" for name in names).encode())
        os.fsync(self.file)
        self.names.update(names)

    def finish(self, output: Path) -> None:
        """A worker's crop into place: recorded, then renamed."""
        self.record([output.name])
        os.replace(crop_file(output), output)

    def close(self) -> None:
        if self.file is not None:
            os.close(self.file)
            self.file = None


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


def check_options(dst_dir: Path, size: int, ben_graham: bool, min_quality: float, check: str) -> None:
    """All crops in DST_DIR are made alike: a rerun with another --size or --ben-graham would skip the existing
    crops and silently mix two kinds of image, so it stops instead. The record also keeps the lowest operating
    point (--min-quality, or the model's) any crop there was accepted at: a rerun at a lower one adds the
    photos it now accepts, but a higher one would leave the crops scoring between the two in images/ beside
    the photos it refuses, so it stops too; and the gradability check that judged them (check:
    fundus.check_version): another one would leave the crops it refuses beside the photos it refuses, so it
    stops as well. (A record written before these were kept has neither: they are taken as this run's.)"""
    wanted, record = {"size": size, "ben_graham": ben_graham}, dst_dir / OPTIONS_FILE
    if not record.is_file():
        write_text_atomic(record, json.dumps({**wanted, "min_quality": min_quality, "quality_check": check}) + "\n")
        return
    try:
        made = json.loads(record.read_text())
    except json.JSONDecodeError:
        made = None
    if not isinstance(made, dict):
        raise UserError(f"{record} is not the JSON object prepare.py writes; delete it if all crops in "
                        f"{dst_dir} were made with {as_flags(wanted)}")
    if {key: made.get(key) for key in wanted} != wanted:
        raise UserError(f"{dst_dir} holds crops made with {as_flags(made)}, not {as_flags(wanted)}; "
                        "rerun with those options or choose another DST_DIR")
    judged = made.get("quality_check")
    if judged is not None and judged != check:
        raise UserError(f"{dst_dir} holds crops judged by another version of the gradability check "
                        f"(quality_model.json {judged}, now {check}): the crops this one refuses would stay in "
                        f"images/ beside the photos it refuses; prepare into another DST_DIR, or delete "
                        f"{dst_dir} to prepare it afresh")
    accepted = made.get("min_quality")
    if isinstance(accepted, (int, float)) and min_quality > accepted:
        raise UserError(f"{dst_dir} holds crops accepted at --min-quality {accepted:.4g}; at {min_quality:.4g} "
                        f"the ones scoring between would stay in images/ beside the photos it refuses: rerun with "
                        f"--min-quality {accepted:.4g} or lower, or choose another DST_DIR")
    lowest = min_quality if not isinstance(accepted, (int, float)) else min(accepted, min_quality)
    if made.get("min_quality") != lowest or judged is None:
        write_text_atomic(record, json.dumps({**made, "min_quality": lowest, "quality_check": check}) + "\n")


def as_flags(options: dict) -> str:
    return f"--size {options.get('size')}" + (" --ben-graham" if options.get("ben_graham") else "")


def pending(photos: list[Path], crops: Crops) -> tuple[list[tuple[Path, Path]], int]:
    """(source, output) pairs still to do, and how many are done already: crops prepare.py recorded."""
    remove_leftovers(crops.out_dir)  # temporary files of a run killed mid-write (a live run's stay)
    done = crops.done()
    todo = [(p, crops.out_dir / f"{p.stem}.jpeg") for p in photos if f"{p.stem}.jpeg" not in done]
    return todo, len(photos) - len(todo)


class Interrupted(BaseException):
    """SIGTERM (as `timeout`, schedulers and `kill` send it), raised where the main process is, as Ctrl-C is."""


def raise_interrupted(signum, frame):
    raise Interrupted(signum)


def run_all(todo: list[tuple[Path, Path]], args: argparse.Namespace,
            crops: Crops) -> tuple[dict[str, dict[Path, tuple]], int, OSError | None]:
    """Crop every pair on args.workers processes: {WRITTEN, KEPT, UNGRADABLE, FAILED: {photo: (reason,
    quality score)}}, the signal that stopped the work early (0: none) and the write that found the disk
    full (runtime.NO_ROOM: a full disk or quota, the file-size limit; None: none); what was finished by then
    is recorded and kept. A write that found no room stops the run as a signal does (the summary, the finished
    crops kept): every photo after it would fail alike, and the crops are all there is to show for the hours
    before it."""
    work = functools.partial(prepare_pair, size=args.size, ben_graham=args.ben_graham, quality=args.quality,
                             keep_ungradable=args.keep_ungradable, min_quality=args.min_quality, owner=os.getpid())
    bar = tqdm(total=len(todo), unit="img", disable=not sys.stderr.isatty())
    outcomes = {WRITTEN: {}, KEPT: {}, UNGRADABLE: {}, FAILED: {}}
    output = dict(todo)
    previous = signal.signal(signal.SIGTERM, raise_interrupted)
    stopped, full = 0, None
    try:
        # chunks of 4: a photo takes 50-150 ms, so handing them out costs nothing, and the last
        # chunks finish together instead of one worker holding a long tail
        for src, outcome, reason, score in map_in_processes(work, todo, args.workers, chunksize=4):
            if outcome in (WRITTEN, KEPT):
                crops.finish(output[src])
            outcomes[outcome][src] = (reason, score)
            bar.update()
    except KeyboardInterrupt:
        stopped = signal.SIGINT
    except Interrupted:
        stopped = signal.SIGTERM
    except OSError as err:
        if err.errno not in NO_ROOM:
            raise
        full = err
    finally:
        signal.signal(signal.SIGTERM, previous)
        bar.close()
        crops.close()
        # crops the workers finished while the pool stopped, never recorded, and what the workers left
        remove_leftovers(crops.out_dir, own=True)
    return outcomes, stopped, full


def report(outcomes: dict[str, dict[Path, tuple]], skipped: int, dst_dir: Path, show_failures: bool = True) -> None:
    """The summary line; ungradable photos listed in DST_DIR/ungradable.csv (path,reason,quality: the
    check's score), failures (the first few shown unless show_failures is off) in DST_DIR/prepare_failures.txt.
    Lists of an earlier run are replaced."""
    ungradable = {**outcomes[UNGRADABLE], **outcomes[KEPT]}
    failures = outcomes[FAILED]
    print(f"prepare: {len(outcomes[WRITTEN]) + len(outcomes[KEPT])} written, {skipped} skipped (already done), "
          f"{len(ungradable)} ungradable" + (f" ({len(outcomes[KEPT])} kept with --keep-ungradable)"
                                             if outcomes[KEPT] else "")
          + f", {len(failures)} failed -> {dst_dir / 'images'}")
    # each list replaced whole, or removed when this run has nothing to list: never removed first, so that a
    # write that fails leaves the earlier list, not none
    if not ungradable:
        (dst_dir / UNGRADABLE_FILE).unlink(missing_ok=True)
    if not failures:
        (dst_dir / FAILURES_FILE).unlink(missing_ok=True)
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
    if not show_failures:
        return
    for line in lines[:SHOWN_FAILURES]:
        print(f"  failed: {line}", file=sys.stderr)
    if len(lines) > SHOWN_FAILURES:
        print(f"  and {len(lines) - SHOWN_FAILURES} more", file=sys.stderr)
    print(f"  all {len(lines)} failures are listed in {dst_dir / FAILURES_FILE}", file=sys.stderr)


# --------------------------------------------------------------------------- labels -> lab layout
def write_lab_layout(table, photos: list[Path], crops: Crops, dst_dir: Path, fraction: float, seed: int) -> None:
    """The four header-less lab CSVs for the rows whose crop exists, split by patient."""
    names = [image_stem(n) for n in table["name"]]
    done = {name[:-len(".jpeg")] for name in crops.done() if name.endswith(".jpeg")}
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
    try:
        parts = patient_split(names, fraction, seed, "--test-fraction", "the rows left")
    except UserError as err:
        # known only now: the quality check decides which photos are kept; the crops stay for a rerun
        raise UserError(f"the lab layout's CSVs were not written ({err}); the {len(done)} crops are kept in "
                        f"{crops.out_dir}: rerun with more photos, another --test-fraction or --keep-ungradable"
                        ) from None
    splits = dict(zip(LAB_FILES, parts))
    tables = {}
    for split, index in splits.items():
        img_csv, label_csv = LAB_FILES[split]
        tables[dst_dir / img_csv] = "".join(f"{names[i]}\n" for i in index)
        tables[dst_dir / label_csv] = "".join(f"{int(grades[i])}\n" for i in index)
    # the four tables as one: a new train split beside an old test split could list a photo in both
    with atomic_writes(list(tables), "w") as files:
        for f, text in zip(files, tables.values()):
            f.write(text)
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
        raise UserError(fraction_sentence("--test-fraction", args.test_fraction))
    return args


def read_labels(path: Path | None, photos: list[Path], fraction: float, seed: int):
    """The --labels table, refused when no name in it matches a photo (the wrong table or SRC_DIR), or when
    the rows that have a photo cannot be split by patient (checked again after the quality check)."""
    if path is None:
        return None
    table = read_labels_table(input_file("--labels", path))
    again = table["excluded"] != ""  # only LISTED_AGAIN: a labels table leaves nothing else out
    if again.any():
        print(f"labels: {again.sum()} rows of --labels {path} list a photo again with the same grade (first: line "
              f"{table.index[again][0]}, {table['name'][again].iloc[0]}): each photo is used once")
        table = table[~again]
    names = [image_stem(n) for n in table["name"]]
    stems = {p.stem for p in photos}
    if not stems.intersection(names):
        raise UserError(f"none of the {len(names)} names in --labels {path} (first: {', '.join(names[:3])}) "
                        f"matches a photo in SRC_DIR (first: {', '.join(sorted(stems)[:3])})")
    patient_split([n for n in names if n in stems], fraction, seed, "--test-fraction",
                  f"the rows of --labels {path} that have a photo in SRC_DIR")
    return table


def check_destination(src_dir: Path, dst_dir: Path) -> None:
    """Before any work: DST_DIR and its images/ folder can take files, and SRC_DIR is not images/ itself,
    inside it or above it (`prepare.py OUT/images OUT` once took the raw photos there for finished crops)."""
    out_dir = dst_dir / "images"
    check_output("DST_DIR", dst_dir, folder=True)
    check_output("DST_DIR", out_dir, folder=True)
    src, out = src_dir.resolve(), out_dir.resolve()
    if src == dst_dir.resolve():
        raise UserError(f"DST_DIR {dst_dir} is SRC_DIR: the crops, their lists and the lab layout would lie among "
                        "the raw photos; choose another DST_DIR")
    # SRC_DIR above images/ is harmless (its subfolders are not searched): `prepare.py raw raw/out` works
    if src == out or out in src.parents:
        where = "is" if src == out else "lies inside"
        raise UserError(f"SRC_DIR {src_dir} {where} DST_DIR's images folder {out_dir}, where the crops go; "
                        "choose a DST_DIR outside SRC_DIR (the raw photos and their crops must not mix)")


def check_lists(dst_dir: Path, labels: Path | None) -> None:
    """Before any work, the rule every output follows (runtime.check_output_file): ungradable.csv replaces
    only an earlier list of prepare.py's, the lab layout's CSVs only those of a folder prepare.py made, and
    neither is the --labels table being read."""
    inputs = [labels] if labels else []
    check_output_file("DST_DIR", dst_dir / UNGRADABLE_FILE, "a list of ungradable photos of data/prepare.py",
                      inputs)
    for name in (name for pair in LAB_FILES.values() for name in pair) if labels else ():
        check_output_file("DST_DIR", dst_dir / name, "a lab-layout table of data/prepare.py", inputs)


def check_foreign(crops: Crops, size: int) -> None:
    """images/ holds only crops prepare.py wrote: other files would be taken for crops or overwritten."""
    foreign = crops.foreign(size)
    if foreign:
        raise UserError(f"{crops.out_dir} holds {len(foreign)} files that prepare.py did not write (first: "
                        f"{', '.join(foreign[:3])}; its crops are listed in {crops.path}); choose another "
                        "DST_DIR, or move them away")


@exit_on_user_error
def main(argv=None) -> int:
    args = parse_args(argv)
    photos = list_photos(args.src_dir)
    # every refusal before the crops: a bad table or folder should not wait hours to fail
    check_destination(args.src_dir, args.dst_dir)
    check_lists(args.dst_dir, args.labels)
    table = read_labels(args.labels, photos, args.test_fraction, args.seed)
    crops = Crops(args.dst_dir)
    check_foreign(crops, args.size)
    crops.out_dir.mkdir(parents=True, exist_ok=True)
    check_options(args.dst_dir, args.size, args.ben_graham,
                  fundus.quality_model()["min_quality"] if args.min_quality is None else args.min_quality,
                  fundus.check_version())
    todo, skipped = pending(photos, crops)
    outcomes, stopped, full = run_all(todo, args, crops)
    done = sum(len(o) for o in outcomes.values())
    if full is not None:
        try:
            report(outcomes, skipped, args.dst_dir)
        except OSError as err:  # the lists need room too; the summary line came first
            if err.errno not in NO_ROOM:
                raise
        where = Path(full.filename).parent if full.filename else args.dst_dir
        print(f"prepare: stopped after {done} of {len(todo)} photos: {full.strerror} in {where}; the finished "
              "crops are kept: make room and run the same command again to continue", file=sys.stderr)
        return 1
    # nothing read is the input's fault, as evaluate.py --images has it: one sentence, exit 2 (runtime.nothing_read)
    nothing = bool(todo) and not skipped and len(outcomes[FAILED]) == len(todo)
    report(outcomes, skipped, args.dst_dir, show_failures=not nothing)
    if nothing:
        first = min(outcomes[FAILED])
        raise UserError(nothing_read(f"SRC_DIR {args.src_dir}", len(todo), first.name, outcomes[FAILED][first][0])
                        + f"; each is listed in {args.dst_dir / FAILURES_FILE}")
    if stopped:
        print(f"prepare: stopped by {signal.Signals(stopped).name} after {done} of {len(todo)} photos; the "
              f"finished crops are kept: run the same command again to continue", file=sys.stderr)
        return 128 + stopped
    if table is not None:
        write_lab_layout(table, photos, crops, args.dst_dir, args.test_fraction, args.seed)
    return 1 if outcomes[FAILED] else 0


if __name__ == "__main__":
    sys.exit(main())
