"""What every script shares at run time: the grading scale, one-line errors and the argument parser,
worker processes, atomic writes, device and precision, and the checkpoint format.

It imports no script of this repo, so that any of them can import it; scripts never import each other
(train.py calls evaluate.py's inference, the one path from logits to numbers).
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import glob
import io
import itertools
import os
import pickle
import random
import re
import shutil
import signal
import sys
import tempfile
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

# The International Clinical Diabetic Retinopathy scale, as EyePACS, APTOS and the lab grade it.
NUM_GRADES = 5
GRADE_NAMES = ("No DR", "Mild", "Moderate", "Severe", "Proliferative")
# logs/<run>.csv, one row per epoch, in this order; a run with a validation split adds VAL_COLUMNS, and
# every run since the clinical metrics the referable-DR AUC last (logs written before lack it).
LOG_COLUMNS = ["epoch", "train_loss", "train_acc", "test_loss", "test_acc", "test_kappa", "lr", "seconds",
               "images_per_s"]
VAL_COLUMNS = ["val_loss", "val_acc", "val_kappa"]
AUC_COLUMN = "test_referable_auc"


# --------------------------------------------------------------------------- errors
EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake in the input the user gave: the message names the flag, file or row."""


class RunFailed(Exception):
    """Not the user's mistake, but an end that one sentence explains (a diverged loss, a dead worker):
    exit status 1, no traceback."""


class WorkerDied(RunFailed):
    """A worker process ended without returning (killed by the system, often for lack of memory)."""


def exit_on_user_error(main):
    """A script's entry point: a UserError ends in its sentence and exit status 2, a RunFailed in its
    sentence and exit status 1; everything else is a bug and keeps its traceback. Third-party warnings
    are said in one line in the script's voice (see say_warning)."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "error"
        with warnings_in_one_line(prog):
            try:
                return main(*args, **kwargs)
            except UserError as err:
                code, message = EXIT_USER_ERROR, str(err)
                if "Original Traceback" in message:
                    # raised in a DataLoader worker, which wraps it in the worker's traceback: keep the sentence
                    message = message.strip().splitlines()[-1].split("UserError: ", 1)[-1]
            except RunFailed as err:
                code, message = 1, str(err)
            except SystemExit as stop:  # argparse, a stopped run: its own words are out already
                code, message = stop.code, None
        end_worker_processes()
        if message is not None:
            print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(code)
    return wrapper


# PIL warns of a photo over Image.MAX_IMAGE_PIXELS (89 M pixels; twice that is an error, a file we call
# unreadable) in words that do not name the photo, and Python's default filter shows one such text once
# per process, however many photos of that size follow: each photo is named here, once per process.
BOMB_WARNING = r"Image size \((\d+) pixels\) exceeds limit of (\d+) pixels"
_warned_photos: set[str] = set()


@contextlib.contextmanager
def warnings_in_one_line(prog: str):
    """Warnings said as `prog: warning: ...` in one line, instead of Python's two (the library's source
    file and line, then that line of code), which read as a crash; a photo PIL finds suspiciously large
    is named. Loader workers forked inside inherit this."""
    with warnings.catch_warnings():  # which restores the filters and showwarning after
        warnings.filterwarnings("always", message=BOMB_WARNING)
        warnings.showwarning = functools.partial(say_warning, prog)
        yield


def say_warning(prog, message, category, filename, lineno, file=None, line=None) -> None:
    text = " ".join(str(message).split())
    bomb = re.match(BOMB_WARNING, text)
    if bomb:
        photo = photo_being_opened()
        if photo in _warned_photos:
            return
        _warned_photos.add(photo)
        pixels, limit = (int(n) for n in bomb.groups())
        text = (f"{photo or 'a photo'} holds {pixels:,} pixels, over PIL's limit against decompression bombs "
                f"({limit:,}); it is read anyway (one over {2 * limit:,} is refused as unreadable)")
    print(f"{prog}: warning: {text}", file=file or sys.stderr)


def photo_being_opened() -> str | None:
    """The file PIL's Image.open is reading, found in its frame on the stack (the warning does not say)."""
    frame = sys._getframe()
    while frame is not None:
        if frame.f_globals.get("__name__") == "PIL.Image":
            name = frame.f_locals.get("filename") or getattr(frame.f_locals.get("fp"), "name", None)
            if name:
                return os.fsdecode(name)
        frame = frame.f_back
    return None


def end_worker_processes() -> None:
    """End the loader workers of a run that stops early, before the interpreter's exit does.

    Past the except clause the error and its frames are gone, so a DataLoader's iterator is garbage and
    its finaliser shuts its workers down in order. Left to the interpreter's exit, multiprocessing sends
    them SIGTERM, and torch's SIGCHLD handler then reported "DataLoader worker (pid N) is killed by signal:
    Terminated" under the sentence (in 2 of 6 runs of a truncated JPEG met in training, none with
    --workers 0). gc only when workers are alive: a collection costs a tenth of a second."""
    import gc
    import multiprocessing

    if multiprocessing.active_children():
        gc.collect()


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help states each default once: argparse's own "(default: X)" only where the help does not already
    say what the default is, and never for a default that is no value (None, off)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with its errors in one line and no usage block: the message names the flag; --help
    states every default once (HelpFormatter)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message}\n")


def progress(iterable, total: int, desc: str, enabled: bool):
    """A tqdm bar; disable=None keeps it quiet when stderr is not a terminal (CI, logs, nohup)."""
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True,
                disable=None if enabled else True)


# --------------------------------------------------------------------------- worker processes
def worker_signals(_worker_id: int | None = None, parent: int | None = None) -> None:
    """Signal handling of every worker process (a pool's initializer, a DataLoader's worker_init_fn).

    Ctrl-C belongs to the parent, which stops the work and ends the workers; SIGTERM ends a worker,
    which is how pools and DataLoader shut workers down. A forked worker otherwise inherits the
    parent's handlers: train.py's stop request once made idle pool workers shrug off the pool's
    SIGTERM, and the parent waited for them forever (make demo hung in about half the runs).

    A worker also ends with its parent, however the parent ends: a parent killed with SIGKILL (or by
    `timeout`, a scheduler, the out-of-memory killer) runs no clean-up, and its workers (about 340 MB
    each in data/prepare.py) went on cropping for good (issue 22)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    die_with_parent(os.getppid() if parent is None else parent)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int) -> None:
    """End this process when `parent` ends: on Linux the kernel sends SIGKILL (prctl PR_SET_PDEATHSIG);
    elsewhere a daemon thread looks for a new parent pid every second. A parent that died before this
    ran (the fork raced its end) is noticed here at once."""
    armed = False
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent:
        os._exit(1)
    if not armed:
        import threading

        def watch():
            while os.getppid() == parent:
                threading.Event().wait(1.0)
            os._exit(1)

        threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def _run_chunk(fn, chunk: list) -> list:
    return [fn(item) for item in chunk]


def map_in_processes(fn, items: list, workers: int, chunksize: int = 1):
    """fn(item) for every item on `workers` processes, yielded in the order they finish; in this
    process when workers <= 1 (plain tracebacks, pdb works).

    concurrent.futures notices a worker that dies and raises WorkerDied at once, where
    multiprocessing.Pool would wait for its lost task forever. Stopping early (Ctrl-C, an error, the
    caller breaking off) cancels every chunk not yet started and waits only for the running ones."""
    if workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    with ProcessPoolExecutor(min(workers, len(items)), initializer=worker_signals,
                             initargs=(None, os.getpid())) as pool:
        futures = [pool.submit(_run_chunk, fn, items[i:i + chunksize]) for i in range(0, len(items), chunksize)]
        try:
            for future in as_completed(futures):
                yield from future.result()
        except BrokenProcessPool:
            raise WorkerDied("a worker process died (killed by the system, often for lack of memory); "
                             "rerun with --workers 1 to see its error") from None
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


# --------------------------------------------------------------------------- paths the user names
def input_file(flag: str, path: str | os.PathLike) -> Path:
    """A file the user named as input (a checkpoint, weights, a table): it must exist and be a regular file
    (reading a FIFO waits for a writer forever, a device such as /dev/zero never ends)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder, expected a file")
    if not path.exists():
        raise UserError(f"{flag} {path} does not exist")
    special = special_file(path)
    if special:
        raise UserError(f"{flag} {path} is not a regular file but {special}; name the file itself")
    return path


def special_file(path: Path) -> str | None:
    """What an existing path that is neither a folder nor a regular file is (a link is followed): "a FIFO
    (named pipe)", "a character device", ...; None for a regular file or a folder."""
    import stat

    mode = os.stat(path).st_mode
    for test, kind in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return None


def input_folder(flag: str, path: str | os.PathLike) -> Path:
    """A folder the user named as input (a dataset, an image folder, a log folder)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, expected a folder")
    if not path.exists():
        raise UserError(f"{flag} {path} does not exist")
    return path


def check_output(flag: str, path: str | os.PathLike, folder: bool) -> Path:
    """Refuse, before any work is done, an output that cannot be written: a folder (folder=True) or a
    file path that is of the other kind, or whose nearest existing ancestor is a file or not writable.
    Nothing is created; a temporary file probes that the ancestor takes new files."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        raise UserError(f"{flag} {path} is a {'file' if folder else 'folder'}, expected a "
                        f"{'folder' if folder else 'file path'}")
    ancestor = path if folder else path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{flag} {path} cannot be created: {ancestor} is a file")
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as err:
        raise UserError(f"{flag} {path} cannot be written: {ancestor} is not writable ({err.strerror})") from None
    return path


def nothing_read(where: str, files: int, first, reason: str) -> str:
    """The sentence of a run that could read none of the photos it was given (evaluate.py --images,
    data/prepare.py): a UserError, exit 2, as any input that holds no usable photo is (a wrong folder,
    files that are not photos, a copy cut short); the per-file lists are written first, with every reason."""
    return (f"none of the {files} files of {where} could be read as an image (first: {first}: {reason}); "
            "nothing was done with them: check that these are the photos you meant")


def fraction_sentence(flag: str, value: float) -> str:
    """Why a held-out share of patients (--test-fraction) is refused: 0 means something else than 1.5 does."""
    if value == 0:
        return (f"{flag} 0 would hold out no patient, leaving no test split to measure on; give the share of "
                "patients to hold out, between 0 and 1 (0.2 is usual)")
    return f"{flag} {value} must lie between 0 and 1: the share of patients held out (0.2 is usual)"


def check_run_name(name: str) -> str:
    """--run-name names a folder under --checkpoint-dir and files under --log-dir: a plain file name."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or os.sep in name or "\0" in name:
        raise UserError(f"--run-name {name!r} must be a plain file name (not empty, no '/', not '.' or '..')")
    return name


# Leading bytes of the files people pass by mistake where a checkpoint or a weight file belongs.
FILE_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
                   (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"), (b"BM", "a BMP image"),
                   (b"%PDF", "a PDF document"), (b"\x1f\x8b", "a gzip archive"), (b"SQLite format 3", "a database"))


# A pickle of protocol 0 or 1 reads as text: it opens with a mark, a global (`cposix\nsystem\n`) or a
# dict/list and its first item, and the loader names what it holds (a global that would run code). An old
# torch.save (before its zip format) opens with its magic number, pickled: as text at protocol 0.
TORCH_MAGIC = 119547037146038801333356
TEXT_PICKLE = re.compile(rb"(\((d|l)p0\n|c[\w.]+\n[\w.]+\n|\}q\x00|\]q\x00|L%dL\n)" % TORCH_MAGIC)
# A binary pickle opens with PROTO and its number, 2 to 5 (Python 3.8+); torch.save's old format with the
# magic number as a LONG1. Random bytes start with \x80 once in 256 files, and with a protocol after it
# once in 16,000.
BINARY_PICKLE = re.compile(rb"\x80[\x02-\x05]")
TORCH_PICKLE = b"\x80\x02\x8a\x0a" + TORCH_MAGIC.to_bytes(10, "little")
# torch.load's sentences for a global weights_only will not load, across versions
FORBIDDEN_GLOBAL = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)")
# what describe_file calls bytes of no format it knows: not text, no image, no archive, no pickle
BINARY = "a binary file"


def describe_file(path: Path) -> str | None:
    """What the file is when it is plainly not a PyTorch file (an image, a text, CSV or JSON file, an empty
    file, a zip archive torch.save did not write, BINARY); None when it may be one (torch.save writes a
    zip archive holding data.pkl; older files are a pickle)."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04"):
        return zip_kind(path)
    if BINARY_PICKLE.match(head) or TEXT_PICKLE.match(head) or head[257:262] == b"ustar":  # torch's first: a tar
        return None
    for signature, kind in FILE_SIGNATURES:
        if head.startswith(signature):
            return kind
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 3:  # not just a character cut at the end of the 4 kB read
            return BINARY
        text = head[:err.start].decode("utf-8")
    if "\x00" in text:
        return BINARY
    first = text.lstrip().split("\n", 1)[0]
    if first.startswith(("{", "[")):
        return "a JSON file"
    return "a CSV file" if "," in first else "a text file"


def zip_kind(path: Path) -> str | None:
    """A zip archive as describe_file names it: None for torch.save's (data.pkl inside) and for one cut
    short (no readable index: torch.load says truncated), else what it is."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            members = [Path(name).name for name in archive.namelist()]
    except (OSError, zipfile.BadZipFile):
        return None
    if "data.pkl" in members:
        return None
    return "a NumPy archive (.npz)" if members and all(m.endswith(".npy") for m in members) else "a zip archive"


def read_torch_file(flag: str, path: str | os.PathLike):
    """torch.load(path, weights_only=True), or one sentence saying what the file is instead: an image, a
    text file or one of this project's other outputs, bytes of no format at all, a pickle that torch.save
    did not write, a truncated file, or a pickle that would run code (refused, never run)."""
    path = input_file(flag, path)
    kind = describe_file(path)
    if kind == BINARY and what_file_is(path) == BINARY:
        raise UserError(f"{flag} {path} is no checkpoint at all: its bytes are neither a zip archive (what "
                        "torch.save writes) nor a pickle, nor any format this project knows (random data, or a "
                        "damaged or encrypted file)")
    if kind:
        raise UserError(f"{flag} {path} is {what_file_is(path)}, not a PyTorch file")
    with open(path, "rb") as f:
        opening = f.read(len(TORCH_PICKLE))
    raw_pickle = BINARY_PICKLE.match(opening) is not None and opening != TORCH_PICKLE
    try:
        with warnings.catch_warnings():
            # "Detected pickle protocol 5 in the checkpoint ...": said before a refusal that says it all
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        forbidden = FORBIDDEN_GLOBAL.search(str(err))
        if forbidden:
            raise UserError(f"refused {flag} {path}: it holds pickled code ({forbidden.group(1)}), not only tensors "
                            "and data; loading it would run that code, so it is refused for safety (weights_only="
                            "True); load only checkpoints written by train.py") from None
        if "Weights only load failed" in str(err):
            operand = re.search(r"Unsupported operand \d+", str(err))
            what = "a Python pickle that torch.save did not write, and" if raw_pickle else "a pickle that"
            raise UserError(f"refused {flag} {path}: {what} torch's safe loader (weights_only=True) cannot "
                            f"read{f' ({operand.group(0)})' if operand else ''}; it may hold code, so it is not "
                            "loaded; load only checkpoints written by train.py") from None
        raise UserError(f"cannot read {flag} {path}: not a PyTorch file") from None
    except Exception as err:  # torch.load's parsers raise anything on foreign bytes: KeyError, IndexError, ...
        if raw_pickle:
            raise UserError(f"{flag} {path} is a Python pickle (pickle.dump's), not a file torch.save wrote; "
                            "load only checkpoints written by train.py") from None
        raise UserError(f"cannot read {flag} {path}: truncated or not a PyTorch file ({type(err).__name__})") from None


# --------------------------------------------------------------------------- what an output may replace
# An output may replace only a file of its own kind (an evaluation run again rewrites its JSON), never an
# input of the same call nor a file of another kind: a checkpoint, a run's log, a photo, a table the user
# gave. Each kind is recognised by its content, not its name: a --out that names the run's log or a photo
# is refused whatever its extension. The trial that asked for this lost a checkpoint (--out best.pt), a
# photo (--out photo.png) and a training log (--predictions logs/<run>.csv), each replaced without a word.
def _first_line(path: Path) -> str:
    with open(path, "rb") as f:
        return f.readline(4096).decode("utf-8-sig", errors="replace").strip()


def _json_keys(path: Path) -> set:
    import json

    try:
        if path.stat().st_size > 1 << 26:  # no JSON this repo writes is that large; a checkpoint often is
            return set()
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    return set(data) if isinstance(data, dict) else set()


def _is_matplotlib_png(path: Path) -> bool:
    # matplotlib writes a Software text chunk into every PNG it saves; a camera's or an editor's does not
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.format == "PNG" and str(img.info.get("Software", "")).startswith("Matplotlib")
    except Exception:  # noqa: BLE001 (PIL raises many types on foreign bytes)
        return False


def _zip_members(path: Path) -> set:
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return {Path(name).name for name in archive.namelist()}
    except (OSError, zipfile.BadZipFile):
        return set()


def _ends_with_export_metadata(path: Path) -> bool:
    # an ONNX ModelProto starts with its ir_version field (tag 0x08) and serialises metadata_props (field 14)
    # after the graph: export.py's keys lie in the file's last bytes
    with open(path, "rb") as f:
        if f.read(1) != b"\x08":
            return False
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        return b"checked_against_pytorch" in f.read()


OUTPUT_KINDS = {
    "a metrics JSON of evaluate.py": lambda p: "confusion_matrix" in _json_keys(p),
    "a predictions table of evaluate.py": lambda p: _first_line(p).startswith("image,grade,pred,"),
    "a table of grades of evaluate.py --images": lambda p: _first_line(p).startswith("path,status,reason,"),
    "a figure drawn by matplotlib": _is_matplotlib_png,
    "a set of Grad-CAM samples of evaluate.py": lambda p: "cams.npy" in _zip_members(p),
    "a summary table of plot.py": lambda p: _first_line(p).startswith("| run |"),
    "a list of left-out photos of dataloader.py": lambda p: _first_line(p).startswith("split,name,reason,path"),
    "a list of ungradable photos of data/prepare.py": lambda p: _first_line(p).startswith("path,reason"),
    "a run's per-epoch log of train.py": lambda p: _first_line(p).startswith("epoch,train_loss,"),
    "a run's summary of train.py": lambda p: {"run_name", "epochs_done", "config"} <= _json_keys(p),
    "a checkpoint": lambda p: "data.pkl" in _zip_members(p),
    "an ONNX model written by export.py": lambda p: _ends_with_export_metadata(p),
    "a gradability model of benchmarks/quality_check.py": lambda p: {"fundus", "gradable", "min_quality"}
    <= _json_keys(p),
    "the figures of benchmarks/quality_check.py": lambda p: {"photos", "held_out"} <= _json_keys(p),
    "a measures cache of benchmarks/quality_check.py": lambda p: _first_line(p).startswith("brightness,saturation,"),
    # the lab layout's CSVs have no header: prepare.py's are those of a folder it made (its options record)
    "a lab-layout table of data/prepare.py": lambda p: (p.name in ("train_img.csv", "train_label.csv", "test_img.csv",
                                                                   "test_label.csv")
                                                        and (p.parent / "prepare_options.json").is_file()),
}


def what_file_is(path: Path) -> str:
    """The kind of an existing file, in words: a FIFO or a device (never opened: reading one would wait or
    never end), one of OUTPUT_KINDS, or what describe_file sees."""
    special = special_file(path)
    if special:
        return special
    for kind, recognise in OUTPUT_KINDS.items():
        if recognise(path):
            return kind
    return describe_file(path) or "a binary file"


def _is_cut_npz(path: Path) -> bool:
    # np.savez_compressed writes each array as a zip member <key>.npy, the zip's directory last: a file cut
    # short opens with a member's header and has no directory (a checkpoint's first member is data.pkl)
    with open(path, "rb") as f:
        head = f.read(30 + 256)
    if not head.startswith(b"PK\x03\x04") or len(head) < 30 or _zip_members(path):
        return False
    length = int.from_bytes(head[26:28], "little")
    return head[30:30 + length].endswith(b".npy")


def may_replace(path: Path, kind: str) -> bool:
    """Whether an output of `kind` may replace the existing file `path`: one of that kind (OUTPUT_KINDS), or
    one that holds nothing to lose, as writers killed before every output was written atomically (issue 31)
    left them on users' disks: an empty file (savefig or np.savez_compressed killed on the final path), or a
    Grad-CAM set cut before its zip directory."""
    if path.is_file() and path.stat().st_size == 0:
        return True
    return OUTPUT_KINDS[kind](path) or (kind == "a set of Grad-CAM samples of evaluate.py" and _is_cut_npz(path))


def same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(os.path.abspath(a)) == Path(os.path.abspath(b))


def check_output_file(flag: str, path: str | os.PathLike, kind: str, inputs=()) -> Path:
    """check_output for a file, and the rule above: refused, before any work and with nothing changed, when
    `path` is one of `inputs` (the files this call reads) or an existing file that is not of `kind` (a key
    of OUTPUT_KINDS)."""
    path = check_output(flag, path, folder=False)
    if path.exists() and special_file(path):  # its recognisers would open it: a FIFO waits for a writer forever
        raise UserError(f"{flag} {path} is not a regular file but {special_file(path)}; {kind} is written as a "
                        "file: give a file path")
    for source in inputs:
        if same_file(path, Path(source)):
            raise UserError(f"{flag} {path} is a file this command reads ({what_file_is(path)}); writing "
                            f"{kind} there would replace it: give another path")
    if path.exists() and not may_replace(path, kind):
        raise UserError(f"{flag} {path} already exists and is {what_file_is(path)}, not {kind}; nothing was "
                        "written: give another path, or move that file away first")
    return path


# --------------------------------------------------------------------------- atomic writes
# Every file a script of this repo writes goes through atomic_writes (issue 31); tests/
# test_atomic_outputs.py finds any write that does not.
TMP_SUFFIX = ".tmp"
# A write that found no room: a full disk, a used-up quota, the file-size limit (ulimit -f; Python ignores
# SIGXFSZ, so the write fails with EFBIG instead of the process being killed).
NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class DiskFull(RunFailed, OSError):
    """A write that found no room (NO_ROOM): not the user's mistake, so one sentence and exit status 1 as
    any RunFailed (data/prepare.py stops on it with its summary and exit 1 too), and still an OSError with
    its errno, so that code which stops on a full disk (data/prepare.py) recognises it whether the system
    or atomic_writes raised it, in this process or in a worker."""

    def __init__(self, code: int, filename: str, sentence: str):
        super().__init__(code, os.strerror(code), filename)
        self.sentence = sentence

    def __str__(self) -> str:
        return self.sentence

    def __reduce__(self):  # a worker's DiskFull reaches the parent whole (OSError pickles only its args)
        return type(self), (self.errno, self.filename, self.sentence)


class _Temporary(io.FileIO):
    """The temporary file, every byte written through write(), which keeps the write that found no room:
    torch.save reports it as its own RuntimeError ("enforce fail at inline_container.cc"), and it still reads
    as a full disk. No descriptor is handed out: PIL's JPEG encoder writes to one itself and reports a full
    disk as "encoder error -2", with no errno; without one it writes through write() as every library does."""
    no_room: OSError | None = None

    def fileno(self) -> int:
        raise io.UnsupportedOperation("fileno: atomic_writes sees every write")

    def write(self, data) -> int:
        try:
            return os.write(super().fileno(), data)
        except OSError as err:
            if err.errno in NO_ROOM:
                self.no_room = err
            raise

    def sync(self) -> None:
        os.fsync(super().fileno())


def tmp_name(path: Path) -> Path:
    """The temporary name atomic_writes writes `path` under: hidden, beside it, one per process."""
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


def process_alive(pid: int) -> bool:
    """Whether a process of this id runs on this machine (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_writes(paths: list[str | os.PathLike], mode: str = "wb"):
    """Write the files `paths` through file objects (a list, one per path, text in UTF-8 with mode "w"); a
    reader sees each old file or the whole new one, never a part: temporary files in the same folders, flushed
    and fsynced, then os.replace (atomic on POSIX), then the folders fsynced. None is replaced before all are
    written and synced, so a failed write replaces none (a kill between the renames, microseconds apart, can
    still mix old and new). On an exception, Ctrl-C included, the temporaries are removed and `paths` are
    untouched; a write that found no room is one sentence (DiskFull, exit status 1). The temporaries of
    earlier writers of these files that were killed are removed first (remove_leftovers), a live one's never."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_writes writes whole files (mode 'w' or 'wb'), not mode {mode!r}")
    paths = [Path(p) for p in paths]
    temporaries, files, at = [], [], paths[0]
    try:
        for at in paths:
            remove_leftovers(at.parent, at.name)
            temporaries.append(_Temporary(tmp_name(at), "w"))
            buffered = io.BufferedWriter(temporaries[-1])
            files.append(buffered if mode == "wb" else io.TextIOWrapper(buffered, encoding="utf-8"))
        yield files
        for at, f, raw in zip(paths, files, temporaries):
            f.flush()
            raw.sync()
            f.close()
        for at, raw in zip(paths, temporaries):
            os.replace(raw.name, at)
    except BaseException as err:
        for raw, f in itertools.zip_longest(temporaries, files):
            raw.close()  # first: what is still buffered is not wanted, and flushing it could fail again
            with contextlib.suppress(ValueError):
                f and f.close()
            Path(raw.name).unlink(missing_ok=True)
        if isinstance(err, Exception):  # Ctrl-C and SystemExit stay what they are
            # a library may have caught the failed write and raised its own error (torch.save does)
            full = [(path, raw.no_room.errno) for path, raw in zip(paths, temporaries) if raw.no_room]
            if isinstance(err, OSError) and err.errno in NO_ROOM:  # creating, syncing, renaming
                full.append((at, err.errno))
            if full:
                raise disk_full(*full[0]) from None
        raise
    for folder in dict.fromkeys(p.parent for p in paths):
        sync_folder(folder)


def sync_folder(folder: Path) -> None:
    """fsync a folder, so that a rename in it outlasts a power cut; where the file system cannot, as good as
    it gets there."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb"):
    """One file written through a file object, atomically (see atomic_writes)."""
    with atomic_writes([path], mode) as (f,):
        yield f


def disk_full(path: Path, code: int = errno.ENOSPC, needed: int | None = None) -> DiskFull:
    """The sentence for a write that found no room (NO_ROOM): which file, why, that nothing was replaced,
    what to do."""
    kept = "nothing was replaced: the file there before, if any, is unchanged"
    if code == errno.EFBIG:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        said = "the file system's largest file" if limit == resource.RLIM_INFINITY else _size(limit)
        grew = f"needs about {_size(needed)}, more than" if needed else "grew past"
        return DiskFull(code, str(path), f"{path} could not be written: it {grew} the file-size limit ({said}, "
                        f"ulimit -f); {kept}; raise the limit (or write to another disk) and run again")
    room = (f"your disk quota on {path.parent} is used up" if code == errno.EDQUOT
            else f"the disk holding {path.parent} is full ({_size(shutil.disk_usage(path.parent).free)} free)")
    need = f", which needs about {_size(needed)}" if needed else ""
    return DiskFull(code, str(path), f"{room}: {path.name} could not be written{need}; {kept}; free some space "
                    "(or write to another disk) and run again")


def _size(n: int) -> str:
    return f"{n / 2**20:,.0f} MB" if n >= 2**20 else f"{max(1, round(n / 2**10)):,} kB"


def tensor_bytes(obj) -> int:
    """The bytes of every tensor in a nested dict/list: about what torch.save writes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def remove_leftovers(folder: str | os.PathLike, name: str | None = None, own: bool = False) -> list[Path]:
    """Remove the temporary files that writers killed mid-write (SIGKILL, a power cut) left in `folder`: all
    of them, or those of the file `name` only; those of a process still running here stay (another run writing
    there now), and with `own` this process's own are removed too (work it has abandoned). Returns what it
    removed. A temporary is named .<name>.<pid>.tmp (atomic_writes) or .<name>.<pid>.<word>.tmp
    (data/prepare.py's crops); a hidden .tmp file without a pid is an older version's, dead since."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    named = re.compile(rf"\.{re.escape(name) if name else '.+?'}\.(\d+)(?:\.[a-z]+)?{re.escape(TMP_SUFFIX)}")
    removed = []
    for path in sorted(folder.glob(f".{glob.escape(name)}.*{TMP_SUFFIX}" if name else f".*{TMP_SUFFIX}")):
        match = named.fullmatch(path.name)
        if match is None and name:
            continue  # another file's, whose name begins with `name`
        pid = int(match.group(1)) if match else None
        if pid is None or (pid == os.getpid() and own) or (pid != os.getpid() and not process_alive(pid)):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """`text` into `path`, atomically (see atomic_writes)."""
    with atomic_write(path, "w") as f:
        f.write(text)


def save_atomic(obj, path: str | os.PathLike) -> None:
    """torch.save(obj) into `path`, atomically (see atomic_writes). A full disk is one sentence with the size
    the file needs: torch.save reports it as `RuntimeError: [enforce fail at inline_container.cc ...]`, which
    _Temporary sees through; where the error came from elsewhere, the free space tells."""
    path = Path(path)
    try:
        with atomic_write(path) as f:
            torch.save(obj, f)
    except DiskFull as err:
        raise disk_full(path, err.errno, tensor_bytes(obj)) from None
    except RuntimeError:
        needed = tensor_bytes(obj)
        if shutil.disk_usage(path.parent).free < needed + 2**20:
            raise disk_full(path, errno.ENOSPC, needed) from None
        raise


def copy_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """A copy of the file `src` at `dst`, atomically (see atomic_writes)."""
    try:
        with open(src, "rb") as source, atomic_write(dst) as f:
            while chunk := source.read(1 << 24):
                f.write(chunk)
    except DiskFull as err:
        raise disk_full(Path(dst), err.errno, os.path.getsize(src)) from None


# --------------------------------------------------------------------------- device and precision
def choose_device(name: str, local_rank: int = 0) -> torch.device:
    """--device auto|cpu|cuda: CUDA when asked for or present; asked for and absent is an error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible here; use --device cpu")
    use_cuda = name == "cuda" or (name == "auto" and torch.cuda.is_available())
    return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def device_name(device: torch.device) -> str:
    """The processor or GPU a figure was measured on, as a person names it: "AMD EPYC, 2 cores"."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {cores} cores"


def precision(amp: bool | None, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether fp16 loss scaling is needed) for --amp/--no-amp (None: on for CUDA)."""
    if not (amp if amp is not None else device.type == "cuda"):
        return None, False
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16, True  # pre-Ampere GPUs: fp16 needs loss scaling
    return torch.bfloat16, False


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The autocast context for `dtype`, or a context that does nothing for full precision."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def memory_format(channels_last: bool) -> torch.memory_format:
    """--channels-last/--no-channels-last as the memory format of the model and its batches."""
    return torch.channels_last if channels_last else torch.contiguous_format


# --------------------------------------------------------------------------- the checkpoint format
# One dict, loadable with torch.load(path, weights_only=True). `model` holds torchvision's key names
# (no `module.` or `_orig_mod.` prefix), so torchvision.models.resnetXX(num_classes=5) loads it strictly.
CHECKPOINT_KEYS = ("model", "arch", "num_classes", "objective", "image_size", "epoch", "best_metric", "best_epoch",
                   "best_metric_name", "config", "data", "pretrained_source", "optimizer", "scheduler", "scaler",
                   "rng", "history", "best_weights_digest")


def make_checkpoint(state_dict: dict, config: dict, data: dict, epoch: int, history: list[dict], best: dict,
                    training: dict, pretrained_source: str | None) -> dict:
    """The checkpoint of a run after `epoch`.

    config: the run's flags as a plain dict (arch from --model, the objective from --loss, image size from
    --image-size); data: where the data came from (layout, folders, split sizes); best: best_epoch, best_metric,
    best_metric_name; training: the state_dicts of optimizer, scheduler and scaler. num_classes is the width of
    the head (objectives.OBJECTIVES: 5 for ce, 1 for mse, 4 for ordinal), so that torchvision's ResNet of that
    width loads `model` strictly."""
    import objectives

    objective = objectives.get(config.get("loss", "ce"))
    return {"model": state_dict, "arch": config["model"], "num_classes": objective.outputs,
            "objective": objective.name,
            "image_size": config["image_size"], "epoch": epoch, **best, "config": config, "data": data,
            "pretrained_source": pretrained_source, **training, "rng": rng_states(), "history": history}


def load_checkpoint(path: str | os.PathLike, flag: str = "checkpoint") -> dict:
    """One of our checkpoints, read with weights_only=True: a file whose pickle would run code is refused,
    and a file that is no checkpoint of ours is named for what it is. `flag` names where the path came
    from in the messages (`checkpoint`, `--resume`)."""
    checkpoint = read_torch_file(flag, path)
    if not isinstance(checkpoint, dict) or not {"model", "arch", "config"} <= set(checkpoint):
        raise UserError(f"{flag} {path} is not a checkpoint of this project (expected the keys model, arch, config)")
    return checkpoint


def restore_model(model: torch.nn.Module, checkpoint: dict, path) -> torch.nn.Module:
    """The checkpoint's weights into `model` (strictly); weights of another shape are one sentence."""
    arch = checkpoint["arch"]
    try:
        model.load_state_dict(checkpoint["model"], strict=True)
    except RuntimeError as err:
        lines = str(err).strip().splitlines()
        detail = (lines[1] if len(lines) > 1 else lines[0]).strip()
        raise UserError(f"{path} says arch {arch} but its weights do not fit {arch} ({detail[:160]})") from None
    return model


def restore_training(checkpoint: dict, optimizer, scheduler, scaler) -> None:
    """Optimiser, schedule, loss scaler and every random number generator, as they were after the epoch."""
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    scaler.load_state_dict(checkpoint["scaler"])
    set_rng_states(checkpoint["rng"])


def run_summary(checkpoint: dict, environment: dict, checkpoint_dir: Path) -> dict:
    """logs/<run>.json: the flags, the data, the environment and the best epoch, from the checkpoint."""
    config, history = checkpoint["config"], checkpoint["history"]
    return {"run_name": config["run_name"], "arch": checkpoint["arch"], "pretrained": is_pretrained(config),
            "objective": checkpoint.get("objective", "ce"), "two_eye": checkpoint["two_eye"]["encoder"] if "two_eye" in checkpoint else None,
            "config": config, "data": checkpoint["data"], "environment": environment,
            "epochs_done": checkpoint["epoch"], "best_epoch": checkpoint["best_epoch"],
            "best_metric": checkpoint["best_metric"], "best_metric_name": checkpoint["best_metric_name"],
            "best": history[checkpoint["best_epoch"] - 1], "last": history[-1],
            "best_weights_digest": checkpoint.get("best_weights_digest"),
            "checkpoint_dir": str(checkpoint_dir)}


def weights_digest(state_dict: dict) -> str:
    """sha256 of a model's weights (names, dtypes, shapes and bytes, in name order): what ties an evaluation,
    a set of Grad-CAMs or a logged best epoch to the one checkpoint it measured."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def checkpoint_digest(checkpoint: dict) -> str:
    """weights_digest of everything that grades in a checkpoint: the model, and a two-eye model's head."""
    weights = dict(checkpoint["model"])
    if "two_eye" in checkpoint:
        weights.update({f"two_eye.head.{name}": t for name, t in checkpoint["two_eye"]["head"].items()})
    return weights_digest(weights)


def is_pretrained(config: dict) -> bool:
    """Whether a run's flags (a checkpoint's config) start from ImageNet weights."""
    return bool(config.get("pretrained") or config.get("weights"))


def rng_states() -> dict:
    """Every generator a run draws from, as tensors and plain lists (weights_only-loadable)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, mt, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(), "numpy": [keys.tolist(), pos, has_gauss, gauss],
             "python": [version, list(mt), gauss_next]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state: dict) -> None:
    """Every generator back to the state rng_states() recorded (CUDA's only on the same GPU count)."""
    torch.set_rng_state(state["torch"])
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, mt, gauss_next = state["python"]
    random.setstate((version, tuple(mt), gauss_next))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
