"""Fundus photographs and their grades: the splits of a dataset, the uint8 input pipeline, samplers.

Workers do what must happen per file (decode, resize, crop) and hand over uint8 CHW tensors; every
random augmentation and the normalisation run batched on the training device (`BatchTransform`),
where they cost almost nothing, instead of per image on the CPU, which feeds the GPU.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

import fundus
import layouts
# the lab's files and the table readers live in layouts.py; data/prepare.py and the tests import them
# from here, as they did before layouts.py existed
from layouts import LAB_FILES, patient_id, read_column, read_labels_table  # noqa: F401
from runtime import (NUM_GRADES, Parser, UserError, check_output_file, exit_on_user_error, fraction_sentence,
                     input_folder, special_file, worker_signals, write_text_atomic)

# Decoded pixels arrive as read-only numpy arrays; torch warns when it wraps one. Nothing writes to
# them in place (BatchTransform makes a float copy first), and copying to silence it costs time.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_DATA_ROOT = Path("data")
DEMO_ROOT = DEFAULT_DATA_ROOT / "demo"


# --------------------------------------------------------------------------- tables of images
@dataclass
class FundusTable:
    """One split: image paths and grades in CSV order. Numpy string arrays, not Python lists: forked
    workers then share the pages instead of copying them as reference counts change."""

    paths: np.ndarray
    grades: np.ndarray
    source: str  # the CSV it came from, for error messages
    raw_photos: bool = False  # camera photos of any size, which FundusDataset crops to the eye
    dataset: str = ""  # what evaluations on it are named after (FundusData.dataset)
    extra: dict = field(default_factory=dict)  # columns kept from the table, an array each (EyePACS' usage)
    excluded: dict = field(default_factory=dict)  # photos its table lists but the split leaves out, by reason

    def __len__(self) -> int:
        return len(self.grades)

    def subset(self, index: np.ndarray, source: str) -> "FundusTable":
        return FundusTable(self.paths[index], self.grades[index], source, self.raw_photos, self.dataset,
                           {key: values[index] for key, values in self.extra.items()})

    @property
    def names(self) -> list[str]:
        return [Path(p).stem for p in self.paths]

    def image_names(self) -> list[str]:
        """Names that tell every image apart, for a predictions file: the names, or where two photos share
        one (IDRiD's testing set numbers its photos from IDRiD_001 again, so --split all holds both), each
        photo's path below the folder they all lie in, without (or, if still shared, with) its extension."""
        names = self.names
        if len(set(names)) == len(names):
            return names
        root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in self.paths])
        relative = [Path(os.path.relpath(os.path.abspath(p), root)).as_posix() for p in self.paths]
        stemless = [os.path.splitext(r)[0] for r in relative]
        return stemless if len(set(stemless)) == len(stemless) else relative

    def digest(self) -> str:
        """sha256 of the names and grades in order: the same split wherever the files lie."""
        text = "".join(f"{name}\t{grade}\n" for name, grade in zip(self.names, self.grades.tolist()))
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class FundusData:
    """Where the data came from and its splits (val: the layout's own validation split, or the part
    --val-fraction holds out; else None). `listed` holds the tables as the dataset publishes them, one
    per split it ships, and `excluded` the photos they list but no split uses (split, name, reason, path)."""

    layout: str  # a name of layouts.LAYOUTS, or "demo"
    root: Path
    image_dir: Path
    train: FundusTable
    test: FundusTable
    val: FundusTable | None = None
    dataset: str = ""
    listed: dict = field(default_factory=dict)
    excluded: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["split", "name", "reason", "path"]))

    def prepare_options(self) -> dict | None:
        """What data/prepare.py recorded when it made this folder (size, Ben Graham, the lowest operating point
        of the quality check a crop was accepted at), if it did."""
        record = self.root / "prepare_options.json"
        return json.loads(record.read_text()) if record.is_file() else None

    def image_size(self) -> int:
        """The longer side of the first training image whose header reads (the demo set trains at its own
        size); a photo that does not read is named when it is loaded, with its line."""
        for path in self.train.paths:
            size = header_size(path)
            if size is not None:
                return max(size)
        raise UserError(f"no photo of the training split ({self.train.source}) can be read as an image, "
                        f"first: {self.train.paths[0]}; fix the files or put good copies in their place")

    def splits(self) -> dict[str, FundusTable]:
        return {name: table for name, table in (("train", self.train), ("test", self.test), ("val", self.val))
                if table is not None}

    def excluded_counts(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in self.excluded["reason"].value_counts().sort_index().items()}

    def all_images(self) -> FundusTable:
        """Every labelled, gradable image of the dataset, all its published splits together (what
        evaluate.py --split all reports on: a checkpoint's external validation)."""
        tables = list(self.listed.values()) or list(self.splits().values())
        common = set.intersection(*(set(t.extra) for t in tables))
        return FundusTable(np.concatenate([t.paths for t in tables]), np.concatenate([t.grades for t in tables]),
                           f"every gradable image of {self.dataset} ({', '.join(t.source for t in tables)})",
                           tables[0].raw_photos, self.dataset,
                           {key: np.concatenate([t.extra[key] for t in tables]) for key in common},
                           self.excluded_counts())

    def record(self) -> dict:
        """What a checkpoint keeps of the data: absolute folders, so that a resume or an evaluation from
        another working folder finds them, and per split the image count and a digest of its names and
        grades, so that data moved elsewhere can be checked to be the same."""
        return {"layout": self.layout, "dataset": self.dataset, "root": str(self.root.absolute()),
                "image_dir": str(self.image_dir.absolute()), "raw_photos": self.train.raw_photos,
                "train_counts": class_counts(self.train.grades).tolist(), "prepare": self.prepare_options(),
                "excluded": self.excluded_counts(),
                "splits": {name: {"images": len(table), "digest": table.digest()}
                           for name, table in self.splits().items()}}


def patient_split(names, fraction: float, seed: int, flag: str = "split fraction",
                  what: str = "the table") -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held out), each in the original order; no patient on both sides; same on every run.
    `flag` and `what` name the fraction and the images in the sentences (--test-fraction, the training
    table): a fraction that leaves either side without a patient is refused with the counts."""
    from sklearn.model_selection import GroupShuffleSplit

    if not 0 < fraction < 1:
        raise UserError(fraction_sentence(flag, fraction))
    groups = [patient_id(n) for n in names]
    patients = len(set(groups))
    if patients < 2:
        raise UserError(f"{flag}: a patient-grouped split needs at least two patients, and {what} holds "
                        f"{patients} ({len(groups)} images)")
    held = math.ceil(fraction * patients)  # how GroupShuffleSplit counts a float test_size
    if held >= patients:
        most = (patients - 1) / patients
        raise UserError(f"{flag} {fraction} of the {patients} patients in {what} holds out {held} and leaves "
                        f"{patients - held} to train on; choose at most {math.floor(most * 100) / 100:g}")
    splitter = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
    kept, held_out = next(splitter.split(np.zeros(len(groups)), groups=groups))
    return np.sort(kept), np.sort(held_out)


def find_root(data_root, log) -> tuple[Path, bool]:
    """The dataset folder, and whether it is the synthetic demo set. data_root None means `data/`, or
    the demo set when data/ holds none; a root the user named that holds no dataset is an error (in
    layouts.detect), never a silent switch to the demo."""
    import synthetic

    if data_root is not None:
        root = input_folder("--data-root", data_root)
        return root, (root / synthetic.MARKER).is_file()  # the demo named by its folder trains at its size too
    if layouts.holds_dataset(DEFAULT_DATA_ROOT):
        return DEFAULT_DATA_ROOT, (DEFAULT_DATA_ROOT / synthetic.MARKER).is_file()
    if synthetic.ensure_demo(DEMO_ROOT):
        log(f"{DEFAULT_DATA_ROOT}/ holds no dataset: generated the synthetic demo set in {DEMO_ROOT}/")
    else:
        log(f"{DEFAULT_DATA_ROOT}/ holds no dataset: using the synthetic demo set in {DEMO_ROOT}/")
    return DEMO_ROOT, True


def dataset_name(layout: layouts.Layout, root: Path) -> str:
    """What evaluations on a dataset are named after: a public layout's name (messidor2), else the data
    root's folder name made safe for file names."""
    if layout.public:
        return layout.name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", root.absolute().name).strip("-.") or layout.name


def as_table(split: layouts.Split, raw_photos: bool, dataset: str) -> FundusTable:
    """The photos of a split's listing that it uses (graded, not left out), as a FundusTable."""
    rows = split.rows[split.rows["excluded"] == ""]
    extra = {key: rows[key].to_numpy() for key in rows.columns if key not in ("name", "grade", "excluded", "path")}
    # where each photo is listed, for the sentences that name it: the table's file and its line in that file
    extra["line"] = rows.index.to_numpy(dtype=np.int64)
    extra["table"] = np.full(len(rows), str(split.table))
    excluded = split.rows["excluded"][split.rows["excluded"] != ""].value_counts().sort_index()
    return FundusTable(rows["path"].to_numpy(dtype=str), rows["grade"].to_numpy(), str(split.table), raw_photos,
                       dataset, extra, {str(k): int(v) for k, v in excluded.items()})


def arrange_splits(tables: dict[str, FundusTable], test_fraction: float, val_fraction: float, seed: int,
                   log) -> tuple[FundusTable, FundusTable, FundusTable | None]:
    """train, test and val: the published splits, with a test split drawn by patient from the training
    table where the dataset publishes none, and with --val-fraction a validation part drawn from train
    (in place of a published one, which is then left out)."""
    train, test, val = tables["train"], tables.get("test"), tables.get("val")
    if test is None:
        kept, held_out = patient_split(train.names, test_fraction, seed, "--test-fraction", train.source)
        train, test = (train.subset(kept, f"{train.source} (train part)"),
                       train.subset(held_out, f"{train.source} (test part)"))
    if val_fraction:
        if val is not None:
            log(f"--val-fraction {val_fraction}: the validation part is drawn from the training split; "
                f"{val.source} is left out")
        kept, held_out = patient_split(train.names, val_fraction, seed, "--val-fraction",
                                       f"the training split ({train.source})")
        train, val = train.subset(kept, train.source), train.subset(held_out, f"{train.source} (validation part)")
    return train, test, val


# How many photos of a layout without a rule of its own (the lab's CSVs, a labels table) are read to tell
# eye crops (square) from raw camera photos (a 4:3 or 3:2 frame): only the files' headers are read.
SHAPE_SAMPLE = 20


def header_size(path) -> tuple[int, int] | None:
    """(width, height) from the file's header, without decoding it; None for a file that is no image."""
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, ValueError):  # UnidentifiedImageError is an OSError
        return None


def all_square(splits: dict[str, layouts.Split], sample: int = SHAPE_SAMPLE) -> bool:
    """Whether a sample of the listed photos (the first of each split) are square (fundus.is_square), as eye
    crops are; raw camera photos are not, and load_square's centre crop would cut their eye's sides. An
    unreadable file is passed over here: it is named when it is loaded, with its row."""
    for split in splits.values():
        sizes = (header_size(path) for path in split.rows["path"][split.rows["path"] != ""][:sample])
        if not all(size is None or fundus.is_square(size) for size in sizes):
            return False
    return True


def load_fundus_data(data_root: str | os.PathLike | None = None, image_dir: str | os.PathLike | None = None,
                     test_fraction: float = 0.2, val_fraction: float = 0.0, split_seed: int = 0,
                     log=print, layout: str = "auto") -> FundusData:
    """The dataset under data_root in its layout (layouts.detect, or the one named), split into
    train/test(/val) and checked before any training: every graded photo it lists is found."""
    root, demo = find_root(data_root, log)
    found, base = layouts.detect(root, layout)
    image_dir = input_folder("--image-dir", image_dir) if image_dir is not None else None
    splits = layouts.read_splits(found, base, image_dir)
    dataset = "demo" if demo else dataset_name(found, root)
    raw = found.raw_photos or not all_square(splits)
    if raw and not found.raw_photos:
        log(f"data: the photos {found.title} lists are not square: raw camera photos, cropped to the eye when "
            "loaded (data/prepare.py crops them once, faster over many epochs)")
    listed = {name: as_table(split, raw, dataset) for name, split in splits.items()}
    train, test, val = arrange_splits(listed, test_fraction, val_fraction, split_seed, log)
    excluded = pd.concat([split.rows.loc[split.rows["excluded"] != "", ["name", "excluded", "path"]]
                         .rename(columns={"excluded": "reason"}).assign(split=name) for name, split in splits.items()],
                         ignore_index=True)[["split", "name", "reason", "path"]]
    folder = image_dir or Path(os.path.commonpath([split.folder for split in splits.values()]))
    return FundusData("demo" if demo else found.name, root, folder, train, test, val, dataset, listed, excluded)


def load_run_data(config: dict, recorded: dict, data_root=None, image_dir=None, log=print) -> FundusData:
    """The data a run trained on, split as it was, from any working folder: the absolute folders its
    checkpoint recorded, or data_root/image_dir where the data has moved since, checked to hold the
    same splits (sizes, names and grades). Never the demo set in place of the run's data; a demo run's
    set is drawn again where it was (it is deterministic)."""
    moved = data_root is not None
    root = data_root if moved else recorded.get("root", config.get("data_root"))
    image_dir = image_dir if moved or image_dir is not None else recorded.get("image_dir", config.get("image_dir"))
    if root is None:  # a checkpoint from before folders were recorded, of a run on the default data/
        root = DEFAULT_DATA_ROOT
    if not moved and recorded.get("layout") == "demo":
        import synthetic

        synthetic.ensure_demo(root)
    elif not moved and not Path(root).is_dir():
        raise UserError(f"the run's data folder {root} (recorded in its checkpoint) does not exist; pass "
                        "--data-root (and --image-dir) where the data is now")
    # the layout the run was read in, not the one detected now: a run of a labels table stays one when a
    # train/ folder (EyePACS') has appeared beside it since, or when it predates the public layouts
    layout = recorded.get("layout") if recorded.get("layout") in layouts.BY_NAME else config.get("layout", "auto")
    data = load_fundus_data(root, image_dir, config.get("test_fraction", 0.2), config.get("val_fraction", 0.0),
                            config.get("split_seed", 0), log=log, layout=layout)
    for name, expected in recorded.get("splits", {}).items():
        table = data.splits().get(name)
        if table is None or table.digest() != expected["digest"]:
            found = "none" if table is None else f"{len(table)} images"
            raise UserError(f"{data.root} does not hold the data the run trained on: its {name} split has "
                            f"{found}, the run's had {expected['images']} images"
                            + (" with other names or grades" if table is not None and len(table) == expected["images"]
                               else "") + "; pass --data-root (and --image-dir) where that data is")
    return data


def class_counts(grades: np.ndarray) -> np.ndarray:
    return np.bincount(np.asarray(grades), minlength=NUM_GRADES)


# --------------------------------------------------------------------------- decoding in workers
def load_square(path: str, size: int) -> Image.Image:
    """Decode as RGB and bring to size x size without distorting the round eye: centre-crop the longer
    side (a raw photo's black margins), then resize. JPEGs decode straight at a reduced scale when the
    file is at least twice the target (`draft`: the DCT does the downscaling, several times faster)."""
    with Image.open(path) as img:
        fundus.check_whole(path, img)  # a JPEG padded with zeros in place of its end decodes, as no photo
        if img.format == "JPEG":
            img.draft("RGB", (size, size))
        img.load()
    if img.mode != "RGB" or img.format == "PNG":  # greyscale, 16-bit, RGBA, palette; a 16-bit PNG's sBIT
        img = fundus.to_rgb(img)  # (an 8-bit RGB image is used as decoded, not copied)
    w, h = img.size
    if w != h:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR, reducing_gap=2.0)
    return img


class NoEye(ValueError):
    """A raw photo in which fundus.find_eye finds no eye (a black, blank or overexposed frame)."""


def load_eye(path: str, size: int) -> tuple[Image.Image, bool]:
    """size x size RGB of any fundus image, and whether it was cropped from a raw photo: an eye crop
    (data/prepare.py's output, the lab's images) exactly as load_square brings the training crops; a raw
    camera photo (any size, the eye on black) cropped to the eye first, as data/prepare.py crops it."""
    try:
        img, field = fundus.photo_for_crop(Path(path), size)
    except fundus.NoField as err:
        raise NoEye(str(err)) from None
    if fundus.is_eye_crop(img, field):
        return load_square(path, size), False
    return fundus.crop_eye(img, size, field), True


def to_uint8_chw(img: Image.Image) -> torch.Tensor:
    """A 3 x H x W view of the decoded H x W x 3 pixels: no transposing copy per image (measured at a
    quarter of the decode time at 512 px); `collate_fundus` stacks the pixels as they lie."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8)).permute(2, 0, 1)


def collate_fundus(batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack HWC pixels into one N x H x W x 3 block and return it viewed as N x 3 x H x W: that is the
    channels_last layout, which the device then keeps. Like default_collate, a worker writes the batch
    straight into shared memory, saving a copy on its way to the main process."""
    pixels = [image.permute(1, 2, 0) for image, _ in batch]
    out = None
    if torch.utils.data.get_worker_info() is not None:
        storage = pixels[0].untyped_storage()._new_shared(len(pixels) * pixels[0].nbytes)
        out = torch.empty(0, dtype=torch.uint8).set_(storage).view(len(pixels), *pixels[0].shape)
    return torch.stack(pixels, out=out).permute(0, 3, 1, 2), torch.tensor([grade for _, grade in batch])


def listed_at(table: FundusTable, index: int) -> str:
    """Where the photo at `index` is listed: `line 6 of train.csv` (the file's own line number, header and
    blank lines counted), or its position where a table was built by hand."""
    if "line" in table.extra and "table" in table.extra:
        return f"line {table.extra['line'][index]} of {table.extra['table'][index]}"
    return f"photo {index + 1} of {table.source}"


# What a photo that cannot be decoded asks of the user, true in every script: only train.py has
# --skip-bad-images (it passes TRAINING_ADVICE), and an evaluation or an export reads the run's data as it
# was, so a line removed from its table would make it another dataset.
FIX_THE_FILE = "fix the file or put a good copy in its place"
TRAINING_ADVICE = "fix or remove it, or pass --skip-bad-images"


class FundusDataset(Dataset):
    """uint8 CHW images and integer grades. Holds names and grades only, never decoded pixels.

    A table of raw camera photos (a public dataset as published) is cropped to the eye on loading, each
    epoch anew: data/prepare.py does it once, which is faster for many epochs. With ben_graham, a photo
    cropped here is also normalised as data/prepare.py --ben-graham would have (for a model trained on such
    crops); the lab's crops keep the plain load_square path."""

    def __init__(self, table: FundusTable, image_size: int, skip_bad_images: bool = False, ben_graham: bool = False,
                 advice: str = FIX_THE_FILE):
        self.table = table
        self.image_size = image_size
        self.skip_bad_images = skip_bad_images
        self.ben_graham = ben_graham
        self.advice = advice

    def __len__(self) -> int:
        return len(self.table)

    def load(self, path: str) -> Image.Image:
        if not self.table.raw_photos:
            return load_square(path, self.image_size)
        img, cropped = load_eye(path, self.image_size)
        return fundus.ben_graham(img, self.image_size / 2) if cropped and self.ben_graham else img

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = str(self.table.paths[index])
        try:
            img = self.load(path)
        except (OSError, UnidentifiedImageError, ValueError) as err:
            where = f"{path} ({listed_at(self.table, index)})"
            problem = "found no eye in" if isinstance(err, NoEye) else "cannot decode"
            if not self.skip_bad_images:
                raise UserError(f"{problem} {where}: {err}; {self.advice}") from None
            warnings.warn(f"skipped unreadable image {where}: {err}", stacklevel=1)
            # grade -1 marks the slot; the training loop drops it and counts it
            return torch.zeros(self.image_size, self.image_size, 3, dtype=torch.uint8).permute(2, 0, 1), -1
        return to_uint8_chw(img), int(self.table.grades[index])


# --------------------------------------------------------------------------- samplers and loaders
class BalancedSampler(Sampler[int]):
    """Draws each grade equally often (with replacement), split across ranks like DistributedSampler,
    with set_epoch so every epoch, and a resumed one, draws the same as an uninterrupted run."""

    def __init__(self, grades: np.ndarray, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        counts = class_counts(grades)
        self.weights = torch.as_tensor(1.0 / counts[grades], dtype=torch.double)
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0
        self.num_samples = math.ceil(len(grades) / num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        drawn = torch.multinomial(self.weights, self.num_samples * self.num_replicas, replacement=True, generator=g)
        return iter(drawn[self.rank::self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples


class ShardSampler(Sampler[int]):
    """Evaluation shard of one rank: every image exactly once over all ranks (no padding duplicates)."""

    def __init__(self, length: int, num_replicas: int = 1, rank: int = 0):
        self.indices = range(rank, length, num_replicas)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def train_sampler(grades: np.ndarray, kind: str, num_replicas: int, rank: int, seed: int) -> Sampler:
    if kind == "balanced":
        return BalancedSampler(grades, num_replicas, rank, seed)
    if kind == "shuffle":
        # num_replicas/rank given explicitly, so one process needs no process group
        return DistributedSampler(range(len(grades)), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
    raise UserError(f"--sampler {kind}: choose shuffle or balanced")


def default_workers(local_world_size: int = 1) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(16, cpus // local_world_size))


def build_loader(dataset: Dataset, batch_size: int, sampler: Sampler, workers: int, device: torch.device,
                 train: bool = False) -> DataLoader:
    """Batches of uint8 images (channels_last) and grades, decoded by `workers` processes, pinned for CUDA.

    A training epoch that would end in a batch of a single image drops it: BatchNorm's statistics over
    one image are noise, and where the last stage's map is 1x1 (images under 64 px) they fail outright.
    The image is drawn again in other epochs; every other batch size is kept."""
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_fundus,
        pin_memory=device.type == "cuda", drop_last=train and len(sampler) % batch_size == 1,
        worker_init_fn=worker_signals, persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
    )


# --------------------------------------------------------------------------- on the device
class BatchTransform:
    """uint8 NCHW batch on the device -> normalised float batch, with the random augmentation
    for training. Fundus photographs have no up or down, so flips and any rotation are valid for
    every grade (the lab's loader flipped only diseased eyes, which lets the model read the grade
    off the orientation)."""

    def __init__(self, device: torch.device, augment: bool, channels_last: bool = False,
                 max_scale: float = 0.1, brightness: float = 0.2, contrast: float = 0.2):
        self.augment = augment
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
        self.max_scale, self.brightness, self.contrast = max_scale, brightness, contrast

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = images.float()
        if self.augment:
            x = self.random_geometry(x, generator)
            x = self.random_colour(x, generator)
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=self.memory_format)

    def random_geometry(self, x: torch.Tensor, generator) -> torch.Tensor:
        """Rotation by any angle, flips and a small zoom in one resampling (affine grid)."""
        n = x.shape[0]
        rand = torch.rand(n, 4, device=x.device, generator=generator)
        angle = rand[:, 0] * 2 * math.pi
        scale = 1 + (rand[:, 1] * 2 - 1) * self.max_scale
        flips = torch.where(rand[:, 2:] < 0.5, -1.0, 1.0)
        cos, sin = torch.cos(angle), torch.sin(angle)
        rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
        linear = rotation @ torch.diag_embed(flips) / scale.view(n, 1, 1)
        theta = torch.cat([linear, torch.zeros(n, 2, 1, device=x.device)], dim=2)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def random_colour(self, x: torch.Tensor, generator) -> torch.Tensor:
        n = x.shape[0]
        rand = torch.rand(n, 2, 1, 1, 1, device=x.device, generator=generator) * 2 - 1
        gain = 1 + rand[:, 0] * self.brightness
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * (1 + rand[:, 1] * self.contrast) + mean
        return (x * gain).clamp_(0, 255)


def dihedral_views(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips and quarter turns of a batch, for test-time augmentation."""
    views = []
    for k in range(4):
        r = torch.rot90(x, k, dims=(2, 3))
        views += [r, torch.flip(r, dims=(3,))]
    return views


# --------------------------------------------------------------------------- the data card
def grade_table(fundus: FundusData) -> str:
    """Per split: images, patients and images per grade, and the table it came from, as plain text."""
    rows = {}
    for name, table in [*fundus.splits().items(), ("all", fundus.all_images())]:
        counts = class_counts(table.grades)
        rows[name] = {"images": len(table), "patients": len({layouts.patient_of(p) for p in table.paths}),
                      **{f"grade {g}": int(c) for g, c in enumerate(counts)},
                      "from": table.source.replace(f"{fundus.root}{os.sep}", "") if name != "all" else "every split"}
    return pd.DataFrame(rows).T.to_string()


def image_sizes(fundus: FundusData, sample: int) -> str:
    """The pixel sizes of up to `sample` photos per split, spread over it (headers only, no decoding)."""
    seen: dict[str, int] = {}
    for table in fundus.splits().values():
        for i in np.unique(np.linspace(0, len(table) - 1, min(sample, len(table))).astype(int)):
            size = header_size(table.paths[i])
            shown = "unreadable" if size is None else f"{size[0]}x{size[1]}"
            seen[shown] = seen.get(shown, 0) + 1
    ranked = sorted(seen.items(), key=lambda item: -item[1])
    more = f" and {len(ranked) - 8} more" if len(ranked) > 8 else ""
    return (f"image sizes (a sample of up to {sample} a split, {sum(seen.values())} photos): "
            + ", ".join(f"{size} ({n})" for size, n in ranked[:8]) + more)


def check_no_shared_photos(fundus: FundusData) -> None:
    """A photo listed in two splits (the same file) is refused before training: a model tested or validated on
    photos it trained on scores too high, and the run's figures would report that as its skill. (The data
    card counts them, and patients in two splits, without refusing: it is where one looks.)"""
    splits = fundus.splits()
    names = list(splits)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            shared = np.intersect1d(splits[first].paths, splits[second].paths)
            if len(shared):
                raise UserError(f"{shared[0]} is listed in both the {first} split ({splits[first].source}) and "
                                f"the {second} split ({splits[second].source}), {len(shared)} photos in all: a "
                                "model scored on photos it trained on scores too high; list each photo in one "
                                "split")


def content_digest(path) -> str:
    """sha1 of a file's bytes, read a chunk at a time: what tells the same photo under another name (the data
    card's --hash, evaluate.py's check of another dataset against the run's training photos)."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def shared_photos(photos: FundusTable, others: list[FundusTable]) -> dict[str, np.ndarray]:
    """Which of `photos` are photos of `others` (a run's training and validation splits): by_name, a photo of
    the same name (file name without extension) and the same bytes; by_content, the same bytes under another
    name; same_name_only, the same name with other bytes (another photo that shares a naming scheme, or the
    same one re-encoded or cropped: not told apart here). Boolean masks over `photos`. Only files of a size
    that occurs on both sides are read (content_digest)."""
    # a name linked to a device or a FIFO is never read (it would never end, or wait for a writer)
    mine = [Path(p) for p in photos.paths]
    theirs = [Path(p) for table in others for p in table.paths]
    sizes = {}
    for path in theirs:
        if not special_file(path):
            sizes.setdefault(path.stat().st_size, []).append(path)
    size_of = [None if special_file(path) else path.stat().st_size for path in mine]
    candidates = {path for i, path in enumerate(mine) if size_of[i] in sizes}
    candidates |= {other for i in range(len(mine)) if size_of[i] in sizes for other in sizes[size_of[i]]}
    digests = {path: content_digest(path) for path in sorted(candidates)}
    their_digests = {digests[path] for path in theirs if path in digests}
    their_names = {path.stem for path in theirs}
    same_bytes = np.array([path in digests and digests[path] in their_digests for path in mine], dtype=bool)
    same_name = np.array([path.stem in their_names for path in mine], dtype=bool)
    return {"by_name": same_name & same_bytes, "by_content": same_bytes & ~same_name,
            "same_name_only": same_name & ~same_bytes}


def duplicates(fundus: FundusData, by_content: bool) -> list[str]:
    """Photos listed twice in a split, photos and patients in more than one split (a leak between train
    and test); with by_content, files with the same bytes under different names (reads every file)."""
    paths = {split: table.paths.tolist() for split, table in fundus.splits().items()}
    twice = {split: len(listed) - len(set(listed)) for split, listed in paths.items()}
    # a photo listed again with its grade is used once (layouts.check_conflicts): counted by its table's split
    for split, n in fundus.excluded["split"][fundus.excluded["reason"] == layouts.LISTED_AGAIN].value_counts().items():
        twice[split] = twice.get(split, 0) + int(n)
    photo_splits: dict[str, set] = {}
    patient_splits: dict[str, set] = {}
    for split, listed in paths.items():
        for path in listed:
            photo_splits.setdefault(path, set()).add(split)
            patient_splits.setdefault(layouts.patient_of(path), set()).add(split)
    lines = [f"duplicates: {sum(twice.values())} photos listed twice in a split"
             + "".join(f" ({n} in {split})" for split, n in twice.items() if n)
             + f", {sum(len(s) > 1 for s in photo_splits.values())} photos and "
               f"{sum(len(s) > 1 for s in patient_splits.values())} patients in more than one split"]
    if by_content:
        lines.append(identical_files(sorted({p for listed in paths.values() for p in listed})))
    return lines


def identical_files(paths: list[str]) -> str:
    """The data card's line of files with the same bytes under different names. Each file is read in chunks
    (a photo is a few MB, a file listed by mistake may be anything), and only a regular file: a name linked
    to /dev/zero would never end (it ended in a MemoryError), a FIFO would wait for a writer."""
    groups: dict[str, list[str]] = {}
    special = []
    for path in paths:
        if special_file(Path(path)):
            special.append(path)
            continue
        groups.setdefault(content_digest(path), []).append(path)
    same = [group for group in groups.values() if len(group) > 1]
    return (f"identical files under different names: {len(same)} groups"
            + (f" (first: {' = '.join(same[0])})" if same else "")
            + (f"; not read: {len(special)} listed photos that are no regular file (first: {special[0]}, "
               f"{special_file(Path(special[0]))})" if special else ""))


def data_card(fundus: FundusData, sample: int = 20, by_content: bool = False) -> str:
    """What a dataset holds, as plain text: its layout, per split the images per grade and patients, the
    photos left out and why, image sizes seen (a sample) and duplicates. No model is needed."""
    layout = layouts.BY_NAME.get(fundus.layout)
    title = layout.title if layout else "the synthetic demo set (lab layout)"
    lines = [f"{fundus.dataset}: {title}, layout {fundus.layout}, at {fundus.root}",
             f"photos in {fundus.image_dir}" + ("; raw camera photos, cropped to the eye when loaded"
                                                if fundus.train.raw_photos else "; used as they are (eye crops)"),
             "", grade_table(fundus), ""]
    left_out = fundus.excluded
    if len(left_out):
        for reason, rows in left_out.groupby("reason"):
            per_split = ", ".join(f"{n} in {split}" for split, n in rows["split"].value_counts().sort_index().items())
            lines.append(f"left out: {len(rows)} {reason} ({per_split}); --excluded-csv lists them")
    else:
        lines.append("left out: none")
    return "\n".join(lines + [image_sizes(fundus, sample)] + duplicates(fundus, by_content))


def build_card_parser() -> Parser:
    p = Parser(description="The data card of a dataset: its layout, counts per split and grade, patients, the "
                           "photos left out, image sizes and duplicates (no model needed).")
    p.add_argument("--data-root", default=None, help="dataset folder (default: data/, else the demo set)")
    p.add_argument("--image-dir", default=None, help="image folder (default: found, as train.py finds it)")
    p.add_argument("--layout", default="auto", choices=["auto", *layouts.NAMES],
                   help="the dataset's layout (default auto: recognised from its files)")
    p.add_argument("--describe", action="store_true", help="print the data card (what this command does anyway)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="as train.py: the drawn test split's share")
    p.add_argument("--val-fraction", type=float, default=0.0, help="as train.py: the drawn validation share")
    p.add_argument("--split-seed", type=int, default=0, help="as train.py: the seed of drawn splits")
    p.add_argument("--sample", type=int, default=20, help="photos per split whose size is read (default 20)")
    p.add_argument("--hash", action="store_true", help="also find identical files by content (reads every file)")
    p.add_argument("--excluded-csv", default=None, metavar="PATH",
                   help="write the photos left out as CSV: split,name,reason,path (e.g. DDR's ungradable ones, "
                        "labelled negatives for a gradability check)")
    return p


@exit_on_user_error
def main(argv=None) -> None:
    """python dataloader.py --data-root DIR: the data card."""
    args = build_card_parser().parse_args(argv)
    if args.sample < 1:
        raise UserError("--sample must be at least 1")
    if args.excluded_csv:
        check_output_file("--excluded-csv", args.excluded_csv, "a list of left-out photos of dataloader.py")
    fundus = load_fundus_data(args.data_root, args.image_dir, args.test_fraction, args.val_fraction,
                              args.split_seed, layout=args.layout)
    print(data_card(fundus, args.sample, args.hash))
    if args.excluded_csv:
        write_text_atomic(args.excluded_csv, fundus.excluded.to_csv(index=False))
        print(f"wrote {args.excluded_csv} ({len(fundus.excluded)} photos left out)")


if __name__ == "__main__":
    main()
