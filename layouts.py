"""Where a dataset's image names, grades and photos are: the public diabetic retinopathy datasets as
their publishers ship them, and this project's own two layouts, in one table (LAYOUTS) that
detection, loading, the error sentences and the data card (`python dataloader.py --data-root DIR`)
all read. No pixels here: dataloader.py decodes them.

The formats, as each dataset's documentation and published loaders give them (no download could be
checked here, without network: the tests build copies with these names, headers and folders; where a
real download differs, the error sentence names the files found):
- eyepacs: Kaggle "Diabetic Retinopathy Detection" (2015). trainLabels.csv `image,level` (35,126 rows)
  with the photos in train/<image>.jpeg; retinopathy_solution.csv `image,level,Usage`, released after
  the competition, grades test/<image>.jpeg, Usage Public or Private naming the leaderboard each photo
  scored on. Both eyes of a patient: `<patient>_left`, `<patient>_right` (Kaggle's data page).
- aptos: Kaggle "APTOS 2019 Blindness Detection". train.csv `id_code,diagnosis` (3,662 rows), photos
  train_images/<id_code>.png; test.csv has no grades, so train.csv is the whole labelled set.
- messidor2: Messidor-2 (ADCIS) with the adjudicated grades of Krause et al. 2018 as Google published
  them on Kaggle (google-brain/messidor2-dr-grades): messidor_data.csv `image_id,adjudicated_dr_grade,
  adjudicated_dme,adjudicated_gradable`, image_id with its extension (.png, .JPG, .jpg); a photo the
  adjudicators could not grade has adjudicated_gradable 0 and no grade. No published split. The Kaggle
  copy most users download ships the same grades as messidor_data.csv `id_code,diagnosis,adjudicated_dme,
  adjudicated_gradable` (id_code with or without its extension) and the photos as 512 px crops in
  messidor-2/preprocess/, named .png or .JPG; both are read (MESSIDOR_COLUMNS).
- idrid: IDRiD "B. Disease Grading" (IEEE DataPort, ISBI 2018 challenge): 2. Groundtruths/ holds
  `a. IDRiD_Disease Grading_Training Labels.csv` and `b. IDRiD_Disease Grading_Testing Labels.csv`,
  columns `Image name,Retinopathy grade,Risk of macular edema ` (names without extension, header cells
  with stray spaces, the training file's rows ending in empty columns); photos in 1. Original Images/
  a. Training Set/<name>.jpg and b. Testing Set/.
- ddr: DDR (github.com/nkicsl/DDR-dataset): DR_grading/train.txt, valid.txt, test.txt, one
  `<file> <grade>` a line, photos in DR_grading/train/, valid/, test/; grade 5 is "ungradable" (DDR's
  own loaders drop it: ignore_ungradable).
- lab and labels-table: this project's (README, "Data").
Patients: only EyePACS' names pair a patient's eyes (patient_id). APTOS, IDRiD and DDR publish no
pairing. Messidor-2's examinations are two photos each, but the Kaggle table does not say which two, so
each photo counts as its own patient there, and a drawn split may put a patient's two eyes on both sides.
"""
from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from io import StringIO
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from fundus import IMAGE_EXTENSIONS
from runtime import NUM_GRADES, UserError

# The lab layout: per split, image names and grades, one value a line, no header row.
LAB_FILES = {"train": ("train_img.csv", "train_label.csv"), "test": ("test_img.csv", "test_label.csv")}
# Labels tables with a header: Kaggle EyePACS trainLabels.csv and APTOS 2019 train.csv.
LABEL_TABLES = {"trainLabels.csv": ("image", "level"), "train.csv": ("id_code", "diagnosis")}
# Why a listed photo is left out of training and evaluation (the data card counts them).
NOT_GRADABLE = "not gradable (adjudicated_gradable 0)"
NO_GRADE = "no adjudicated grade"
UNGRADABLE = "ungradable (grade 5)"
DDR_UNGRADABLE = "5"
LISTED_AGAIN = "listed again with the same grade (used once)"
# Where photos are looked for when none of a layout's own folders holds them all: sub-folders this deep
# (Kaggle's uploads often nest a folder in one of the same name; Messidor-2 ships its photos in several
# folders, which archives put four or more levels down), at most this many folders.
SEARCH_DEPTH = 8
SEARCH_FOLDERS = 500


# --------------------------------------------------------------------------- reading tables
def read_lines(path: Path) -> tuple[list[str], list[int]]:
    """A lab-layout CSV: one value per line and no header row (pandas' default header would drop the
    first image). The values and their line numbers in the file; blank lines are skipped."""
    if not path.is_file():
        raise UserError(f"{path} is missing" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        text = path.read_text(encoding="utf-8-sig")  # Excel and Notepad start a UTF-8 file with a BOM
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a text file") from None
    values, numbers = [], []
    for number, line in enumerate(text.splitlines(), 1):
        value = line.strip().strip('"').strip()
        if not value:
            continue
        if "," in value:
            raise UserError(f"{path} line {number} holds several columns ({line.strip()[:40]!r}); "
                            "the lab layout holds one value per line")
        values.append(value)
        numbers.append(number)
    if not values:
        raise UserError(f"{path} is empty")
    return values, numbers


def read_column(path: Path) -> list[str]:
    """The values of a lab-layout CSV (see read_lines)."""
    return read_lines(path)[0]


def parse_grades(values, source: str, lines) -> np.ndarray:
    """Integers 0-4, or one sentence naming the file, its line number and the value."""
    grades = np.empty(len(values), dtype=np.int64)
    for i, (value, line) in enumerate(zip(values, lines)):
        text = str(value).strip()
        if re.fullmatch(r"[+-]?\d+(\.0*)?", text) is None or not 0 <= int(float(text)) < NUM_GRADES:
            raise UserError(f"{source} line {line}: grade '{value}' is not an integer 0-4")
        grades[i] = int(float(text))
    return grades


def listing(names, grades, lines, excluded=None, **extra) -> pd.DataFrame:
    """What every reader returns: a row per listed photo, `name`, `grade` (-1 where left out), `excluded`
    (why it is left out, "" when it is not) and kept columns (EyePACS' `usage`), indexed by line number."""
    excluded = np.full(len(grades), "", dtype=object) if excluded is None else np.asarray(excluded, dtype=object)
    return pd.DataFrame({"name": [str(n).strip() for n in names], "grade": np.asarray(grades, dtype=np.int64),
                         "excluded": excluded, **{k: np.asarray(v) for k, v in extra.items()}}, index=list(lines))


def read_header_table(path: Path) -> pd.DataFrame:
    """A CSV with a header row as stripped strings, indexed by the file's line numbers, blank lines
    dropped. Trailing empty cells are cut before pandas reads a line (IDRiD's training table ends its
    rows in empty columns), and header cells lose their stray spaces (IDRiD's 'Risk of macular edema ')."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a text file") from None
    text = "\n".join(re.sub(r"[,\s]+$", "", line) for line in text.splitlines())
    try:
        frame = pd.read_csv(StringIO(text), dtype=str, keep_default_na=False, skip_blank_lines=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise UserError(f"{path} is not a readable CSV ({' '.join(str(err).split())})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    frame = frame.fillna("").astype(str).apply(lambda column: column.str.strip())
    frame.index += 2  # line 1 is the header (none of these tables has quoted line breaks)
    return frame[(frame != "").any(axis=1)]


def graded_rows(frame: pd.DataFrame, path: Path, name: str, grade: str, usage: str | None = None) -> pd.DataFrame:
    """The listing of a table with one graded photo a row (EyePACS, APTOS, IDRiD, a labels table)."""
    wanted = [name, grade] + ([usage] if usage else [])
    if not set(wanted) <= set(frame.columns):
        raise UserError(f"{path} has columns {list(frame.columns)}; expected {', '.join(map(repr, wanted))}")
    if frame.empty:
        raise UserError(f"{path} has a header but no rows")
    grades = parse_grades(frame[grade].tolist(), str(path), frame.index.tolist())
    return listing(frame[name], grades, frame.index, **({"usage": frame[usage]} if usage else {}))


def read_graded_csv(path: Path, name: str, grade: str, usage: str | None = None) -> pd.DataFrame:
    return graded_rows(read_header_table(path), path, name, grade, usage)


def read_labels_table(path: Path) -> pd.DataFrame:
    """A Kaggle/APTOS labels table (either header of LABEL_TABLES) as a listing: `name`, `grade`, ..."""
    frame = read_header_table(path)
    for name, grade in LABEL_TABLES.values():
        if {name, grade} <= set(frame.columns):
            return check_conflicts(graded_rows(frame, path, name, grade), path)
    expected = " or ".join(f"'{a},{b}'" for a, b in LABEL_TABLES.values())
    raise UserError(f"{path} has columns {list(frame.columns)}; expected a header {expected}")


def read_lab(path: Path) -> pd.DataFrame:
    """One split of the lab layout: <split>_img.csv and the <split>_label.csv beside it."""
    label_path = path.with_name(dict(LAB_FILES.values())[path.name])
    (names, name_lines), (labels, lines) = read_lines(path), read_lines(label_path)
    if len(names) != len(labels):
        raise UserError(f"{path} lists {len(names)} images but {label_path} lists {len(labels)} grades; "
                        "the two files must have one line per image, in the same order")
    # indexed by the image's line in <split>_img.csv, the file the listing is named after
    return listing(names, parse_grades(labels, str(label_path), lines), name_lines)


# messidor_data.csv as published: Google's names, and the widely used Kaggle copy's (the same grades, its
# photos 512 px crops in messidor-2/preprocess/), each as (photo, grade, gradable)
MESSIDOR_COLUMNS = (("image_id", "adjudicated_dr_grade", "adjudicated_gradable"),
                    ("id_code", "diagnosis", "adjudicated_gradable"))


def read_messidor(path: Path) -> pd.DataFrame:
    """messidor_data.csv in either of MESSIDOR_COLUMNS: the photos the adjudicators could not grade
    (adjudicated_gradable 0) and any without a grade are listed as left out, not refused."""
    frame = read_header_table(path)
    wanted = next((names for names in MESSIDOR_COLUMNS if set(names) <= set(frame.columns)), None)
    if wanted is None:
        expected = " or ".join(f"'{','.join(names)}'" for names in MESSIDOR_COLUMNS)
        raise UserError(f"{path} has columns {list(frame.columns)}; expected {expected} (Google's table or the "
                        "Kaggle copy's)")
    name, grade, _ = wanted
    gradable = frame["adjudicated_gradable"]
    bad = ~gradable.isin(["", "0", "1", "0.0", "1.0"])
    if bad.any():
        raise UserError(f"{path} line {frame.index[bad][0]}: adjudicated_gradable "
                        f"'{gradable[bad].iloc[0]}' is not 0 or 1")
    excluded = np.where(gradable.isin(["0", "0.0"]), NOT_GRADABLE, np.where(frame[grade] == "", NO_GRADE, ""))
    kept = excluded == ""
    grades = np.full(len(frame), -1, dtype=np.int64)
    grades[kept] = parse_grades(frame[grade][kept].tolist(), str(path), frame.index[kept].tolist())
    return listing(frame[name], grades, frame.index, excluded)


def read_ddr(path: Path) -> pd.DataFrame:
    """DR_grading/<split>.txt: `<file> <grade>` a line (space-separated, no header); grade 5 is
    DDR's ungradable, listed as left out."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # Excel and Notepad start a UTF-8 file with a BOM
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a text file") from None
    rows = [(number, line.split()) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    for number, fields in rows:
        if len(fields) != 2:
            raise UserError(f"{path} line {number} holds {' '.join(fields)[:40]!r}; expected '<file> <grade>'")
    if not rows:
        raise UserError(f"{path} is empty")
    lines, names, values = [n for n, _ in rows], [f[0] for _, f in rows], [f[1] for _, f in rows]
    excluded = np.where(np.array(values) == DDR_UNGRADABLE, UNGRADABLE, "")
    kept = excluded == ""
    grades = np.full(len(rows), -1, dtype=np.int64)
    grades[kept] = parse_grades(np.array(values)[kept], str(path), np.array(lines)[kept])
    return listing(names, grades, lines, excluded)


def check_conflicts(rows: pd.DataFrame, path: Path) -> pd.DataFrame:
    """A photo a table lists twice with two verdicts (two grades, or a grade and a reason to leave it out)
    is refused, naming the lines: one of them is wrong, and training on both teaches noise. The same
    photo listed again with the same grade is used once: its later lines are left out as LISTED_AGAIN,
    which the data card, train.py's data line and evaluate.py's report count (a table joined from two
    copies would otherwise weigh those photos double, and count them twice in a test split)."""
    rows, marked = rows[rows["excluded"] != LISTED_AGAIN], rows  # read_splits checks a labels table again
    verdict = rows["grade"].astype(str) + "|" + rows["excluded"].astype(str)
    photo = rows["name"].map(image_stem)
    mixed = verdict.groupby(photo).nunique()
    mixed = mixed[mixed > 1]
    if mixed.empty:
        again = marked["name"].map(image_stem).duplicated() & (marked["excluded"] == "")
        return marked.assign(excluded=marked["excluded"].where(~again, LISTED_AGAIN))
    first = mixed.index[0]
    listed = rows[photo == first]
    said = ", ".join(f"line {line} {'grade ' + str(g) if not why else why}"
                     for line, g, why in zip(listed.index, listed["grade"], listed["excluded"]))
    more = f" ({len(mixed) - 1} more photos like it)" if len(mixed) > 1 else ""
    raise UserError(f"{path} lists photo {first} with different grades: {said}{more}; keep the right line "
                    "and delete the other")


def patient_id(name: str) -> str:
    """EyePACS names both eyes `<patient>_left` / `<patient>_right`; other names are their own patient."""
    return re.sub(r"_(left|right)$", "", Path(name).stem, flags=re.IGNORECASE)


def patient_of(path: str) -> str:
    """Whose photo a file is, across the splits of a dataset: the patient its name gives (EyePACS'), else
    the file itself; names alone are not enough: IDRiD's testing set numbers its photos from IDRiD_001 again."""
    name = Path(path).stem
    patient = patient_id(name)
    return patient if patient != name else str(path)


# --------------------------------------------------------------------------- the layouts
@dataclass(frozen=True)
class Source:
    """One split's table in a layout: its file (the first of `tables` present, relative to the layout's
    folder), how it is read, and the folder its photos are published in. An optional source is read
    only when its table and its photo folder are both there (EyePACS' test split)."""

    split: str  # train, val or test; a layout with no test source gets a patient-grouped one drawn
    tables: tuple[str, ...]
    read: Callable[[Path], pd.DataFrame]
    photos: str = "images"
    optional: bool = False

    def table_in(self, base: Path) -> Path | None:
        return next((base / name for name in self.tables if (base / name).is_file()), None)


@dataclass(frozen=True)
class Layout:
    """A dataset layout: recognised by its first table (plus `marks`, folders that must be there too),
    in the data root or in the folder it was published in (`nests`: the data root may be that folder or
    its parent). Photos of a raw layout are camera photos of any size, cropped to the eye on loading. A
    public layout names external evaluations after itself; the others after the data root's folder."""

    name: str
    title: str
    sources: tuple[Source, ...]
    marks: tuple[str, ...] = ()
    nests: tuple[str, ...] = ()
    raw_photos: bool = True
    public: bool = True

    def folder(self, root: Path) -> Path:
        for nest in self.nests:
            while (root / nest).is_dir():  # an archive unzipped into a folder of its own name nests twice
                root = root / nest
        return root

    def matches(self, base: Path) -> bool:
        return self.sources[0].table_in(base) is not None and all((base / mark).is_dir() for mark in self.marks)

    def signature(self) -> str:
        """The files that identify the layout, for messages: `ddr (DR_grading/train.txt)`."""
        nest = f"{self.nests[0]}/" if self.nests else ""
        files = [" or ".join(nest + t for t in self.sources[0].tables)] + [f"{nest}{m}/" for m in self.marks]
        return f"{self.name} ({' and '.join(files)})"


def _csv(name: str, grade: str, usage: str | None = None) -> Callable[[Path], pd.DataFrame]:
    return functools.partial(read_graded_csv, name=name, grade=grade, usage=usage)


IDRID_COLUMNS = ("Image name", "Retinopathy grade")
IDRID_IMAGES = "1. Original Images"
LAYOUTS = (
    Layout("eyepacs", "Kaggle EyePACS 2015", (
        Source("train", ("trainLabels.csv",), _csv("image", "level"), "train"),
        Source("test", ("retinopathy_solution.csv",), _csv("image", "level", "Usage"), "test", optional=True)),
        marks=("train",)),
    Layout("aptos", "APTOS 2019", (Source("train", ("train.csv",), _csv("id_code", "diagnosis"), "train_images"),),
           marks=("train_images",)),
    Layout("messidor2", "Messidor-2 (adjudicated grades)",
           (Source("train", ("messidor_data.csv",), read_messidor, "IMAGES"),)),
    Layout("idrid", "IDRiD disease grading", (
        Source("train", ("2. Groundtruths/a. IDRiD_Disease Grading_Training Labels.csv",), _csv(*IDRID_COLUMNS),
               f"{IDRID_IMAGES}/a. Training Set"),
        Source("test", ("2. Groundtruths/b. IDRiD_Disease Grading_Testing Labels.csv",), _csv(*IDRID_COLUMNS),
               f"{IDRID_IMAGES}/b. Testing Set")), nests=("B. Disease Grading",)),
    Layout("ddr", "DDR grading", (Source("train", ("train.txt",), read_ddr, "train"),
                                  Source("val", ("valid.txt",), read_ddr, "valid"),
                                  Source("test", ("test.txt",), read_ddr, "test")), nests=("DR_grading",)),
    Layout("lab", "the lab's CSVs", (Source("train", ("train_img.csv",), read_lab),
                                     Source("test", ("test_img.csv",), read_lab)), raw_photos=False, public=False),
    Layout("labels-table", "a labels table", (Source("train", tuple(LABEL_TABLES), read_labels_table),),
           raw_photos=False, public=False),
)
BY_NAME = {layout.name: layout for layout in LAYOUTS}
NAMES = tuple(BY_NAME)


def detect(root: Path, name: str = "auto") -> tuple[Layout, Path]:
    """The layout of the dataset at root (the first of LAYOUTS that matches, or the one named) and the
    folder its files are in; one sentence when there is none."""
    if name != "auto":
        layout = BY_NAME[name]
        base = layout.folder(root)
        if layout.sources[0].table_in(base) is None:
            raise UserError(f"--layout {name}: {base} has no {' or '.join(layout.sources[0].tables)}; the "
                            f"{layout.title} layout is {layout.signature()}")
        return layout, base
    for layout in LAYOUTS:
        base = layout.folder(root)
        if layout.matches(base):
            return layout, base
    raise UserError(no_layout_sentence(root))


def holds_dataset(root: Path) -> bool:
    return any(layout.matches(layout.folder(root)) for layout in LAYOUTS)


def no_layout_sentence(root: Path) -> str:
    """--data-root holds nothing this project reads: what it does hold, the layouts there are, and the
    sub-folder to pass when one holds a dataset (an archive unzipped one level deeper)."""
    entries = sorted((e for e in os.scandir(root) if not e.name.startswith(".")), key=lambda e: e.name)
    names = [e.name + ("/" if e.is_dir() else "") for e in entries]
    held = f"it holds {', '.join(names[:8])}" + (f" and {len(names) - 8} more" if len(names) > 8 else "") \
        if names else "it is empty"
    inner = next((Path(e.path) for e in entries if e.is_dir() and holds_dataset(Path(e.path))), None)
    hint = f"; its sub-folder {inner.name}/ holds one: pass --data-root {inner}" if inner else ""
    return (f"--data-root {root} holds no dataset in a layout this project reads ({held}){hint}; the layouts are "
            f"{', '.join(layout.signature() for layout in LAYOUTS)}")


# --------------------------------------------------------------------------- finding the photos
def index_images(image_dir: Path) -> dict[str, str]:
    """File names by stem and by full name, in one directory listing (no stat per image)."""
    if not image_dir.is_dir():
        raise UserError(f"image folder {image_dir} does not exist; pass --image-dir")
    found: dict[str, str] = {}
    with os.scandir(image_dir) as entries:
        for entry in entries:
            stem, ext = os.path.splitext(entry.name)
            if ext.lower() in IMAGE_EXTENSIONS:
                found[entry.name] = entry.path
                rank = IMAGE_EXTENSIONS.index(ext.lower())
                previous = found.get(stem)
                if previous is None or IMAGE_EXTENSIONS.index(os.path.splitext(previous)[1].lower()) > rank:
                    found[stem] = entry.path
    return found


def image_stem(name: str) -> str:
    """A listed name without its image extension (`20051020_43808_0100_PP.png`), other names as they are."""
    stem, ext = os.path.splitext(name)
    return stem if ext.lower() in IMAGE_EXTENSIONS else name


def lookup(images: dict[str, str], name: str) -> str | None:
    """A listed name's file: by its full name, else (a name with an image extension, as Messidor-2 and
    DDR list them) by its stem, so that photos converted to another format are found too."""
    found = images.get(name)
    if found is None and image_stem(name) != name:
        found = images.get(image_stem(name))
    return found


def photo_folders(base: Path, source: Source, table: Path, image_dir: Path | None) -> list[Path]:
    """Where a split's photos are looked for, in order: with --image-dir X, X/<published folder>,
    X/<its last part> and X; else the published folder, images/, the table's folder and the layout's."""
    if image_dir is not None:
        folders = [image_dir / source.photos, image_dir / Path(source.photos).name, image_dir]
    else:
        folders = [base / source.photos, base / "images", table.parent, base]
    return list(dict.fromkeys(f for f in folders if f.is_dir()))


def sub_folders(top: Path):
    """The folders below top, breadth first, SEARCH_DEPTH deep, hidden ones skipped."""
    level, seen = [top], 0
    for _ in range(SEARCH_DEPTH):
        below = []
        for folder in level:
            with os.scandir(folder) as entries:
                below += sorted(Path(e.path) for e in entries if e.is_dir() and not e.name.startswith("."))
        for folder in below:
            seen += 1
            if seen > SEARCH_FOLDERS:
                return
            yield folder
        level = below


def locate(names: list[str], folders: list[Path], search: Path | None, table: Path) -> tuple[Path, dict[str, str]]:
    """The first of `folders` that holds every listed photo (then, when search is a folder, the first
    sub-folder of it that does) and its index; else one sentence: how many are missing where they were
    expected, and which folder holds most of them, to pass as --image-dir."""
    best: tuple[Path | None, dict, int] = (None, {}, -1)
    searched = []
    for folder in [*folders, *(f for f in sub_folders(search) if f not in folders)] if search else folders:
        images = index_images(folder)
        held = sum(lookup(images, n) is not None for n in names)
        if held == len(names):
            return folder, images
        if held > best[2]:
            best = (folder, images, held)
        if held:
            searched.append((folder, images))
    # photos spread over sibling folders (Messidor-2's Base11 ... Base34) are one set; folders elsewhere are
    # not joined: a resized copy beside the originals would mix two versions of the photos
    for parent in dict.fromkeys(folder.parent for folder, _ in searched) if search else ():
        siblings = [images for folder, images in searched if folder.parent == parent]
        together = {key: path for images in reversed(siblings) for key, path in images.items()}  # first wins
        if len(siblings) > 1 and all(lookup(together, n) is not None for n in names):
            return parent, together
    expected = folders[0] if folders else search or table.parent
    where, images, held = best if best[2] > 0 else (expected, {}, 0)
    missing = [n for n in names if lookup(images, n) is None]
    sentence = (f"{len(missing)} of {len(names)} images listed in {table} are missing from {where} "
                f"(first: {', '.join(missing[:5])}); expected <name> with one of {', '.join(IMAGE_EXTENSIONS)} there")
    if where != expected:
        sentence = (f"the images listed in {table} are not in {expected}: {where} holds {held} of its {len(names)} "
                    f"(missing there: {', '.join(missing[:5])}); pass --image-dir {where}")
    raise UserError(sentence)


@dataclass
class Split:
    """One split as its table lists it: the listing with a `path` per photo ("" for a photo left out
    that is not there either), the table it came from and the folder its photos are in."""

    source: Source
    table: Path
    rows: pd.DataFrame
    folder: Path


def read_splits(layout: Layout, base: Path, image_dir: Path | None = None) -> dict[str, Split]:
    """Every split the layout's tables list, its photos found (see photo_folders and locate); a table a
    required source lacks is one sentence."""
    splits = {}
    for source in layout.sources:
        table = source.table_in(base)
        if source.optional and (table is None or not (base / source.photos).is_dir()):
            continue
        if table is None:
            raise UserError(f"{base / source.tables[0]} is missing: the {layout.title} layout's {source.split} "
                            f"split (the layout is {layout.signature()})")
        rows = check_conflicts(source.read(table), table)
        graded = rows["excluded"] == ""
        folder, images = locate(rows["name"][graded].tolist(), photo_folders(base, source, table, image_dir),
                                base if image_dir is None else None, table)
        rows["path"] = [lookup(images, n) or "" for n in rows["name"]]
        splits[source.split] = Split(source, table, rows, folder)
    return splits
