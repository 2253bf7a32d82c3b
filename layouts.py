"""Where a dataset's image names and grades are written: the lab's header-less CSVs, labels tables,
and the image folders they point into. No pixels here (dataloader.py decodes them).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from fundus import IMAGE_EXTENSIONS
from runtime import NUM_GRADES, UserError

# The lab layout: per split, image names and grades, one value a line, no header row.
LAB_FILES = {"train": ("train_img.csv", "train_label.csv"), "test": ("test_img.csv", "test_label.csv")}
# Labels tables with a header: Kaggle EyePACS trainLabels.csv and APTOS 2019 train.csv.
LABEL_TABLES = {"trainLabels.csv": ("image", "level"), "train.csv": ("id_code", "diagnosis")}


def read_lines(path: Path) -> tuple[list[str], list[int]]:
    """A lab-layout CSV: one value per line and no header row (pandas' default header would drop the
    first image). The values and their line numbers in the file; blank lines are skipped."""
    if not path.is_file():
        raise UserError(f"{path} is missing" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        text = path.read_text()
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


def resolve_paths(names: list[str], images: dict[str, str], image_dir: Path, source: str) -> np.ndarray:
    missing = [n for n in names if n not in images]
    if missing:
        shown = ", ".join(missing[:5])
        raise UserError(f"{len(missing)} of {len(names)} images listed in {source} are missing from {image_dir} "
                        f"(first: {shown}); expected <name> with one of {', '.join(IMAGE_EXTENSIONS)} there")
    return np.array([images[n] for n in names])


def read_labels_table(path: Path) -> pd.DataFrame:
    """A Kaggle/APTOS labels table as columns `name`, `grade` (validated)."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skip_blank_lines=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not a readable CSV ({' '.join(str(err).split())})") from None
    frame.index += 2  # the file's line numbers: line 1 is the header (no quoted line breaks in these tables)
    frame = frame[(frame != "").any(axis=1)]  # blank lines
    for name_col, grade_col in LABEL_TABLES.values():
        if {name_col, grade_col} <= set(frame.columns):
            if frame.empty:
                raise UserError(f"{path} has a header but no rows")
            grades = parse_grades(frame[grade_col].tolist(), str(path), frame.index.tolist())
            return pd.DataFrame({"name": frame[name_col].str.strip().to_numpy(), "grade": grades})
    expected = " or ".join(f"'{a},{b}'" for a, b in LABEL_TABLES.values())
    raise UserError(f"{path} has columns {list(frame.columns)}; expected a header {expected}")


def patient_id(name: str) -> str:
    """EyePACS names both eyes `<patient>_left` / `<patient>_right`; other names are their own patient."""
    return re.sub(r"_(left|right)$", "", Path(name).stem, flags=re.IGNORECASE)
