"""Speed and memory figures a user plans with. BENCHMARKS.md holds what this printed.

    python bench.py            # every CPU measurement (about 10 minutes on 2 cores)
    python bench.py --quick    # the same measurements, seconds each (the test suite runs this)
    python bench.py --cuda     # the GPU table: ResNet18/50 at 512 px
    python bench.py --export   # the deployment table: PyTorch eager vs onnxruntime fp32 and INT8 on this CPU

Every claim is a ratio of two measurements taken in the same process on the same files. Timed
regions are synchronised on CUDA; each figure is the median of several rounds after a warm-up.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.utils.data import Dataset

import dataloader
import deploy
import evaluate
import fundus
import models
import objectives
import optimisation
import synthetic
from runtime import (Parser, UserError, autocast, exit_on_user_error, precision,
                     write_text_atomic)

GIB = 1024 ** 3
CE = objectives.OBJECTIVES["ce"]  # speed does not depend on the objective: the lab's is timed


# --------------------------------------------------------------------------- helpers
def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {len(os.sched_getaffinity(0))} cores{gpu}; torch {torch.__version__}, torchvision "
            f"{torchvision.__version__}, Python {platform.python_version()}; {datetime.date.today().isoformat()}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_rate(fn, count: int, rounds: int, warmup: int = 1) -> float:
    """Items per second of fn() (which handles `count` items), the median over rounds after warm-up."""
    return interleaved_rates({"only": fn}, count, rounds, warmup)["only"]


def interleaved_rates(fns: dict, count: int, rounds: int, warmup: int = 1) -> dict:
    """Like median_rate for several functions, run in turn within each round, so that a slow spell of
    a shared machine slows all of them rather than one."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    rates = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            rates[name].append(count / (time.perf_counter() - start))
    return {name: statistics.median(r) for name, r in rates.items()}


def table(title: str, header: list[str], rows: list[list]) -> str:
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def demo_set(root: Path, n_train: int, size: int, n_test: int = 16) -> dataloader.FundusData:
    synthetic.generate_demo(root, n_train=n_train, n_test=n_test, size=size, seed=1, quiet=True)
    return dataloader.load_fundus_data(root)


class LabStyleDataset(Dataset):
    """The classic lab loader: PIL decode, random flips on PIL images, float ToTensor and Normalize
    in the worker, so each worker writes 12 bytes per pixel where ours writes 3."""

    def __init__(self, table: dataloader.FundusTable, size: int):
        from torchvision import transforms as T

        self.table = table
        self.transform = T.Compose([T.Resize(size), T.CenterCrop(size), T.RandomHorizontalFlip(),
                                    T.RandomVerticalFlip(), T.ToTensor(),
                                    T.Normalize(dataloader.IMAGENET_MEAN, dataloader.IMAGENET_STD)])

    def __len__(self):
        return len(self.table)

    def __getitem__(self, i):
        with Image.open(self.table.paths[i]) as img:
            return self.transform(img.convert("RGB")), int(self.table.grades[i])


class CpuRotationDataset(dataloader.FundusDataset):
    """Our uint8 pipeline plus a random rotation on the CPU: what moving rotation to the device saves."""

    def __getitem__(self, i):
        img = dataloader.load_square(str(self.table.paths[i]), self.image_size)
        img = img.rotate(float(np.random.uniform(0, 360)), resample=Image.BILINEAR)
        return dataloader.to_uint8_chw(img), int(self.table.grades[i])


# --------------------------------------------------------------------------- input pipeline
def bench_input_pipeline(fundus: dataloader.FundusData, size: int, rounds: int) -> dict:
    """Images per second in one process (= per loader worker) on the same files."""
    table = fundus.train
    paths = [str(p) for p in table.paths]

    def decode(p):
        with Image.open(p) as img:
            return np.asarray(img.convert("RGB"))

    def bare():
        for p in paths:
            decode(p)

    def bare_batched():  # what any batched pipeline must add: one copy into the batch
        for i in range(0, len(paths), 32):
            torch.from_numpy(np.stack([decode(p) for p in paths[i:i + 32]]))

    ours = dataloader.FundusDataset(table, size)

    def run(dataset):
        # through a DataLoader in this process, so batching (collation) is counted too
        collate = dataloader.collate_fundus if isinstance(dataset, dataloader.FundusDataset) else None
        loader = torch.utils.data.DataLoader(dataset, batch_size=32, num_workers=0, collate_fn=collate)

        def consume():
            for _ in loader:  # each batch dropped as the next comes, as training does: none kept in memory
                pass
        return consume

    def items():
        for i in range(len(ours)):
            ours[i]

    rates = interleaved_rates({
        "bare decode (PIL open + RGB)": bare,
        "bare decode, stacked in batches of 32": bare_batched,
        "ours, per image (Dataset items)": items,
        "ours, batches of 32 from the DataLoader": run(ours),
        "ours + rotation on the CPU": run(CpuRotationDataset(table, size)),
        "lab-style: flips + float ToTensor + Normalize": run(LabStyleDataset(table, size)),
    }, len(paths), rounds)
    base = rates["bare decode (PIL open + RGB)"]
    return {name: {"images_per_s": r, "vs_bare": r / base} for name, r in rates.items()}


# --------------------------------------------------------------------------- training throughput
class DeviceBatches:
    """Synthetic uint8 batches already on the device: the model's own speed, no input pipeline."""

    def __init__(self, batches: int, batch_size: int, size: int, device: torch.device):
        g = torch.Generator(device="cpu").manual_seed(0)
        self.data = [(torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, generator=g).to(device),
                      torch.randint(0, 5, (batch_size,), generator=g).to(device)) for _ in range(min(batches, 4))]
        self.batches = batches

    def __len__(self):
        return self.batches

    def __iter__(self):
        return (self.data[i % len(self.data)] for i in range(self.batches))


def ours_train_rate(arch: str, loader, device: torch.device, amp: bool, channels_last: bool, compile: bool,
                    epochs: int = 2) -> float:
    """Images/s of optimisation.train_one_epoch, the code train.py runs, in its last epoch."""
    model = models.build_model(arch).to(device, memory_format=torch.channels_last if channels_last
                                        else torch.contiguous_format)
    run_model = torch.compile(model) if compile else model
    optimizer = optimisation.build_optimizer("sgd", model, lr=1e-3, momentum=0.9, weight_decay=5e-4)
    scheduler = optimisation.build_scheduler(optimizer, "constant", warmup_epochs=0, epochs=epochs,
                                             steps_per_epoch=len(loader))
    amp_dtype, fp16 = precision(amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=fp16)
    transform = dataloader.BatchTransform(device, augment=True, channels_last=channels_last)
    stats = None
    for epoch in range(1, epochs + 1):
        if hasattr(loader, "sampler"):
            loader.sampler.set_epoch(epoch)
        stats = optimisation.train_one_epoch(run_model, loader, transform, optimisation.Criterion(CE), optimizer,
                                             scheduler, scaler, autocast(device, amp_dtype), epoch, aug_seed=epoch)
    return stats["images_per_s"]


def lab_train_rate(arch: str, table: dataloader.FundusTable, size: int, device: torch.device, workers: int,
                   epochs: int = 2) -> float:
    """The lab's loop: float batches of 4 from the CPU, NCHW, fp32, loss.item() every step."""
    loader = torch.utils.data.DataLoader(LabStyleDataset(table, size), batch_size=4, shuffle=True,
                                         num_workers=workers, persistent_workers=workers > 0)
    model = models.build_model(arch).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    criterion = torch.nn.CrossEntropyLoss()
    rate = 0.0
    for _ in range(epochs):
        model.train()
        start, seen = time.perf_counter(), 0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            loss = criterion(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss.item()
            seen += len(y)
        sync(device)
        rate = seen / (time.perf_counter() - start)
    return rate


def loader_rate(table: dataloader.FundusTable, size: int, batch: int, workers: int, device: torch.device,
                epochs: int = 2) -> float:
    """Images/s of the input pipeline alone, batches moved to the device and nothing else: the ceiling
    that training with the real pipeline can reach."""
    loader = real_loader(table, size, batch, workers, device)
    rate = 0.0
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        start, seen = time.perf_counter(), 0
        for images, grades in loader:
            images.to(device, non_blocking=True)
            seen += len(grades)
        sync(device)
        rate = seen / (time.perf_counter() - start)
    return rate


def real_loader(table: dataloader.FundusTable, size: int, batch: int, workers: int, device: torch.device):
    return dataloader.build_loader(dataloader.FundusDataset(table, size), batch, dataloader.train_sampler(table.grades, "shuffle", 1,
                                                                                           0, 0), workers, device)


def bench_training_cpu(fundus: dataloader.FundusData, archs, size: int, batch: int, workers: int) -> dict:
    device, out = torch.device("cpu"), {}
    for arch in archs:
        lab = lab_train_rate(arch, fundus.train, size, device, workers)
        ours = ours_train_rate(arch, real_loader(fundus.train, size, batch, workers, device), device,
                               amp=False, channels_last=True, compile=False)
        nchw = ours_train_rate(arch, real_loader(fundus.train, size, batch, workers, device), device,
                               amp=False, channels_last=False, compile=False)
        out[arch] = {"lab_style": lab, "ours": ours, "ours_nchw": nchw, "ratio": ours / lab,
                     "ratio_nchw": nchw / lab}
    return out


# --------------------------------------------------------------------------- ours vs torchvision
def step_time(model, optimizer, x, y) -> float:
    """One real training step, timed to its end: cross-entropy, backward, SGD step."""
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    sync(x.device)
    return time.perf_counter() - start


def bench_models(archs, size: int, batch: int, rounds: int, device: torch.device, amp: bool) -> dict:
    """Training-step time of ours and torchvision's with the same weights (and so the same arithmetic,
    denormals included: two different random initialisations once timed 1.28x apart on an AMD EPYC),
    the steps interleaved so that drifts in clock or load hit both."""
    out = {}
    ctx = autocast(device, torch.bfloat16 if amp else None)
    for arch in archs:
        torch.manual_seed(0)
        ours = models.build_model(arch).to(device, memory_format=torch.channels_last)
        theirs = getattr(torchvision.models, arch)(num_classes=5).to(device, memory_format=torch.channels_last)
        theirs.load_state_dict(ours.state_dict())
        steps = {name: (m, torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4))
                 for name, m in (("ours", ours), ("torchvision", theirs))}
        x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 5, (batch,), device=device)
        times = {"ours": [], "torchvision": []}
        with ctx:
            for r in range(rounds + 2):
                for name in ("ours", "torchvision") if r % 2 else ("torchvision", "ours"):
                    t = step_time(*steps[name], x, y)
                    if r >= 2:  # two warm-up rounds
                        times[name].append(t)
        o, t = statistics.median(times["ours"]), statistics.median(times["torchvision"])
        out[arch] = {"ours_ms": o * 1e3, "torchvision_ms": t * 1e3, "ratio": o / t}
    return out


# --------------------------------------------------------------------------- evaluation
def bench_eval(table: dataloader.FundusTable, arch: str, size: int, batch: int, workers: int,
               device: torch.device, amp: bool) -> dict:
    model = models.build_model(arch).to(device, memory_format=torch.channels_last).eval()
    loader = dataloader.build_loader(dataloader.FundusDataset(table, size), batch, dataloader.ShardSampler(len(table)), workers, device)
    transform = dataloader.BatchTransform(device, augment=False, channels_last=True)
    ctx = autocast(device, torch.bfloat16 if amp else None)
    out = {}
    for tta in (False, True):
        rate = median_rate(lambda: (evaluate.predict(model, loader, transform, ctx, CE, tta=tta), sync(device)),
                           len(table), rounds=2)
        out["tta" if tta else "plain"] = rate
    return out


# --------------------------------------------------------------------------- camera photographs
CAMERA_SIZE = (4000, 3000)  # 12 MP, a fundus camera's full-size file


def camera_jpeg(path: Path) -> Path:
    """A 12 MP camera JPEG: a drawn eye 2,800 px across, centred in a black 4:3 frame, with a sensor's noise
    (sigma 6): about 3 MB like a camera's file. Without the noise a drawn photo compresses to a tenth of that
    and decodes twice as fast as a real one."""
    frame = Image.new("RGB", CAMERA_SIZE)
    eye = synthetic.draw_fundus(2, 2800, np.random.default_rng(0))
    frame.paste(eye, ((CAMERA_SIZE[0] - 2800) // 2, (CAMERA_SIZE[1] - 2800) // 2))
    noise = np.random.default_rng(1).normal(0, 6, (CAMERA_SIZE[1], CAMERA_SIZE[0], 3)).astype(np.float32)
    Image.fromarray(np.clip(np.asarray(frame, np.float32) + noise, 0, 255).astype(np.uint8)).save(path, quality=92)
    return path


@contextlib.contextmanager
def decoding(draft: bool):
    """fundus decodes JPEGs at a reduced scale (draft) or, with draft False, at full size."""
    saved = fundus.DRAFT_SPAN  # an AttributeError if fundus renames it, rather than timing the draft twice
    fundus.DRAFT_SPAN = saved if draft else math.inf  # asks for more than the full size: no reduction
    try:
        yield
    finally:
        fundus.DRAFT_SPAN = saved


def bench_camera_jpeg(work: Path, rounds: int, size: int = 512) -> dict:
    """Milliseconds per 12 MP camera JPEG: decoding it and finding its field (fundus.photo_for_crop), the
    quality check alone on the photo so decoded (fundus.assess, the field given: what the check adds), what
    data/prepare.py does with each photo (fundus.prepare_photo: that, the quality check, crop, save at `size`)
    and what evaluate.py --images does before the model (PhotoDataset's item), each with the JPEG decoded at a
    reduced scale (draft mode, as both do) and at full size. "decoded" holds the sizes each mode decoded."""
    path = camera_jpeg(work / "camera.jpeg")
    dataset = evaluate.PhotoDataset([path], size)

    def timed(fn, draft: bool):
        def run():
            with decoding(draft):
                fn()
        return run

    decoded_photo = {mode: None for mode in ("draft", "full")}

    def check(draft: bool):
        # the quality check alone (fundus.assess with the field found), on the photo as that mode decodes it
        if decoded_photo["draft" if draft else "full"] is None:
            decoded_photo["draft" if draft else "full"] = fundus.photo_for_crop(path, size)
        photo, field = decoded_photo["draft" if draft else "full"]
        return lambda: fundus.assess(photo, field)

    stages = {"decode + find the field": lambda: fundus.photo_for_crop(path, size),
              "prepare.py": lambda: fundus.prepare_photo(path, work / "camera_crop.jpeg", size, False),
              "--images": lambda: dataset[0]}
    runs = {f"{name}, {mode} decode": timed(fn, mode == "draft") for name, fn in stages.items()
            for mode in ("draft", "full")}
    for mode in ("draft", "full"):
        with decoding(mode == "draft"):
            runs[f"quality check, {mode} decode"] = check(mode == "draft")
    rates = interleaved_rates(runs, 1, rounds)
    assert dataset[0][2] == evaluate.GRADED, dataset[0][3]  # the photo is graded, not turned away early
    decoded = {}
    for mode in ("draft", "full"):
        with decoding(mode == "draft"):
            decoded[mode] = list(fundus.photo_for_crop(path, size)[0].size)
    return {**{name: 1e3 / rate for name, rate in rates.items()}, "decoded": decoded}


# --------------------------------------------------------------------------- host memory
def tree_memory(pid: int) -> tuple[int, int]:
    """(sum of PSS, sum of RSS) over a process and its children. PSS shares forked pages fairly."""
    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0, 0
    pss = rss = 0
    for p in procs:
        try:
            info = p.memory_full_info()
            pss += info.pss
            rss += info.rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return pss, rss


def peak_training_memory(root: Path, out_dir: Path, size: int, workers: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).with_name("train.py")), "--data-root", str(root), "--image-size",
           str(size), "--epochs", "1", "--batch-size", "64", "--workers", str(workers), "--device", "cpu",
           "--checkpoint-dir", str(out_dir / "checkpoints"), "--log-dir", str(out_dir / "logs"), "--quiet",
           "--no-augment"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak_pss = peak_rss = 0
    while proc.poll() is None:
        pss, rss = tree_memory(proc.pid)
        peak_pss, peak_rss = max(peak_pss, pss), max(peak_rss, rss)
        time.sleep(0.1)
    if proc.returncode != 0:
        raise RuntimeError(f"train.py failed: {proc.stderr.read()[-2000:]}")
    return {"peak_pss_mb": peak_pss / 2 ** 20, "peak_rss_sum_mb": peak_rss / 2 ** 20}


def bench_memory(work: Path, rows: int, size: int, workers: int) -> dict:
    out = {}
    for n in (rows, rows // 10):
        root = work / f"memory_{n}"
        synthetic.generate_demo(root, n_train=n, n_test=64, size=16, seed=2, quiet=True)
        out[n] = peak_training_memory(root, work / f"memory_run_{n}", size, workers)
    big, small = out[rows]["peak_pss_mb"], out[rows // 10]["peak_pss_mb"]
    out["ratio"] = big / small
    return out


# --------------------------------------------------------------------------- CUDA
def bench_cuda(work: Path, quick: bool, save) -> dict:
    """The GPU table. Eager measurements first, torch.compile (slow to start) last; `save` is called
    after each figure so that a run cut short still leaves what it measured."""
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    # TF32 on for every row, the lab-style one too: the rows differ only in what each names
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    size, batch = (128, 16) if quick else (512, 64)
    workers = dataloader.default_workers()
    fundus = demo_set(work / "cuda", n_train=96 if quick else 2560, size=size)
    lab_table = fundus.train.subset(np.arange(32 if quick else 400), "bench")
    steps = 4 if quick else 30
    out = {"image_size": size, "batch": batch, "workers": workers, "train": {}, "memory": {}, "models": {}}
    archs = ("resnet18", "resnet50")
    # the input pipeline alone, batches copied to the device and nothing else: the ceiling of the
    # real-pipeline rows (on the H200 it was the same from 8 to 16 workers: a serial stage, not decoding)
    out["loader_only"] = loader_rate(fundus.train, size, batch, workers, device, epochs=3)
    save(out)
    for arch in archs:
        row = out["train"].setdefault(arch, {})
        synthetic_batches = DeviceBatches(steps, batch, size, device)
        row["bf16 CL synthetic"] = ours_train_rate(arch, synthetic_batches, device, True, True, False)
        save(out)
        row["bf16 CL real pipeline"] = ours_train_rate(arch, real_loader(fundus.train, size, batch, workers, device),
                                                       device, True, True, False)
        save(out)
        row["lab-style (batch 4, fp32 NCHW, float pipeline)"] = lab_train_rate(arch, lab_table, size, device, workers)
        save(out)
        row["fp32/tf32 CL synthetic"] = ours_train_rate(arch, synthetic_batches, device, False, True, False)
        row["bf16 NCHW synthetic"] = ours_train_rate(arch, synthetic_batches, device, True, False, False)
        save(out)
        del synthetic_batches
        out["memory"][arch] = cuda_memory_fit(arch, size, device, (8, 16) if quick else (16, 32, 64, 96))
        torch.cuda.empty_cache()
        save(out)
    out["models"] = bench_models(archs, size, batch, 3 if quick else 10, device, amp=True)
    eval_table = fundus.train.subset(np.arange(min(len(fundus.train), 1024)), "bench")
    out["eval"] = bench_eval(eval_table, "resnet50", size, 2 * batch, workers, device, amp=True)
    save(out)
    for arch in archs:
        start = time.perf_counter()
        out["train"][arch]["bf16 CL compile synthetic"] = ours_train_rate(
            arch, DeviceBatches(steps, batch, size, device), device, True, True, True)
        out["train"][arch]["compile seconds (first two epochs)"] = time.perf_counter() - start
        save(out)
    return out


def cuda_memory_fit(arch: str, size: int, device: torch.device, batches) -> dict:
    """Peak allocated memory of a bf16 channels_last training step per batch size, a line through those
    points, and from it the largest batch that fits each card (1 GiB kept for the CUDA context)."""
    model = models.build_model(arch).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    peaks = {}
    for b in batches:
        x = torch.randn(b, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 5, (b,), device=device)
        for _ in range(2):  # the second step holds the momentum buffers too
            torch.cuda.reset_peak_memory_stats(device)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sync(device)
        peaks[b] = torch.cuda.max_memory_allocated(device) / GIB
        del x, y, loss
    slope, intercept = np.polyfit(list(peaks), list(peaks.values()), 1)
    fits = {f"{gb} GB": max(0, int((gb * 1e9 / GIB - 1.0 - intercept) / slope)) for gb in (8, 12, 24, 80)}
    del model, optimizer
    return {"peak_gib": peaks, "gib_per_image": slope, "fixed_gib": intercept, "largest_batch": fits}


# --------------------------------------------------------------------------- deployment
# ResNet18/50 at the lab's 224 and 512 px, one photo at a time (a clinic's laptop) and batch 32 (a reading
# centre's queue); a 512 px ResNet50 batch takes tens of seconds on 2 cores, so fewer rounds there
EXPORT_ARCHS, EXPORT_SIZES, EXPORT_BATCHES = ("resnet18", "resnet50"), (224, 512), (1, 32)
EAGER, EAGER_CL = "PyTorch eager (NCHW)", "PyTorch eager (channels_last)"
FP32, INT8_STATIC, INT8_DYNAMIC = "onnxruntime fp32", "onnxruntime INT8 static", "onnxruntime INT8 dynamic"


def cpu_features() -> str:
    """The instruction-set extensions INT8 and fp32 kernels choose by (VNNI: int8 dot products)."""
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
    try:
        flags = next(line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    return ", ".join(f for f in wanted if f in flags) or "none of " + ", ".join(wanted)


def export_runners(model: torch.nn.Module, size: int, dynamic: bool, threads: int | None) -> dict:
    """name -> fn(uint8 batch) for each way of running the same weights: PyTorch eager as evaluate.py runs a
    checkpoint (both memory formats), and the file export.py writes in onnxruntime, fp32 and INT8 (static:
    calibrated on random images, which sets other ranges than photos would but the same kernels; dynamic)."""
    cpu = torch.device("cpu")
    nchw = evaluate.TorchGrader(model, dataloader.BatchTransform(cpu, augment=False), contextlib.nullcontext(), CE)
    channels_last = evaluate.TorchGrader(
        copy.deepcopy(model).to(memory_format=torch.channels_last),
        dataloader.BatchTransform(cpu, augment=False, channels_last=True), contextlib.nullcontext(), CE)
    proto = deploy.export_fp32(model, size)
    rng = np.random.default_rng(0)
    calibration = [rng.integers(0, 256, (4, 3, size, size), dtype=np.uint8) for _ in range(2)]
    sessions = {FP32: deploy.session(proto.SerializeToString(), threads),
                INT8_STATIC: deploy.session(deploy.quantise_static(proto, calibration), threads)}
    if dynamic:
        sessions[INT8_DYNAMIC] = deploy.session(deploy.quantise_dynamic(proto), threads)
    runners = {EAGER: nchw, EAGER_CL: channels_last}
    runners.update({name: (lambda images, s=s: deploy.run(s, images.numpy())) for name, s in sessions.items()})
    return runners


def bench_export(quick: bool, threads: int | None = None) -> dict:
    """ms per image of each runner, per model, size and batch, the runners interleaved within each round; with
    threads, PyTorch and onnxruntime both compute on that many threads (default: each its own, one per core)."""
    if threads:
        torch.set_num_threads(threads)
    archs, sizes, batches = (("resnet18",), (64,), (1, 4)) if quick else (EXPORT_ARCHS, EXPORT_SIZES, EXPORT_BATCHES)
    rows = []
    for arch in archs:
        torch.manual_seed(0)
        model = models.build_model(arch).eval()
        for size in sizes:
            # dynamic INT8 quantises activations per call and runs convolutions as ConvInteger, which has no
            # fast kernel here (measured ~5x slower than fp32 at 224 px): timed at the smaller size only
            runners = export_runners(model, size, dynamic=size <= 224, threads=threads)
            for batch in batches:
                images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8,
                                       generator=torch.Generator().manual_seed(batch))
                with torch.inference_mode():
                    rates = interleaved_rates({name: (lambda r=r: r(images)) for name, r in runners.items()}, batch,
                                              rounds=1 if quick else (3 if size <= 224 else 2))
                rows.append({"arch": arch, "size": size, "batch": batch,
                             "ms_per_image": {name: 1e3 / rate for name, rate in rates.items()}})
    import onnxruntime

    return {"rows": rows, "cpu_features": cpu_features(), "threads": threads or "default",
            "versions": f"onnxruntime {onnxruntime.__version__}, opset {deploy.OPSET}"}


def report_export(r: dict) -> str:
    e = r["export"]
    names = [EAGER, EAGER_CL, FP32, INT8_STATIC, INT8_DYNAMIC]
    rows = []
    for row in e["rows"]:
        ms = row["ms_per_image"]
        eager = min(ms[EAGER], ms[EAGER_CL])
        rows.append([display(row["arch"]), row["size"], row["batch"],
                     *(f"{ms[n]:.1f}" if n in ms else "not measured" for n in names),
                     f"{eager / ms[FP32]:.2f}x", f"{ms[FP32] / ms[INT8_STATIC]:.2f}x"])
    return table(f"Deployment on this CPU: ms per image, the same weights run four ways ({e['versions']}; "
                 f"threads: {e.get('threads', 'default')}; CPU features: {e['cpu_features']})",
                 ["model", "px", "batch", *names, "onnxruntime fp32 vs faster eager", "INT8 static vs fp32"], rows)


def display(arch: str) -> str:
    return arch.replace("resnet", "ResNet")


# --------------------------------------------------------------------------- report
def report_cpu(r: dict) -> str:
    parts = [f"Machine: {r['machine']}\n", f"Command: `{r['command']}`\n"]
    p = r["input_pipeline"]
    parts.append(table(f"Input pipeline, one process (= per loader worker), {r['pipeline_size']}x"
                       f"{r['pipeline_size']} JPEGs", ["pipeline", "images/s", "vs bare decode"],
                       [[k, f"{v['images_per_s']:.1f}", f"{v['vs_bare']:.0%}"] for k, v in p.items()]))
    t = r["training"]
    parts.append(table(f"Training images/s on the CPU, {r['train_size']} px, {r['workers']} workers "
                       f"(ours: batch {r['train_batch']}, uint8 pipeline, device-side augmentation)",
                       ["model", "lab-style (batch 4, NCHW, float pipeline)", "ours, channels_last", "ratio",
                        "ours, NCHW", "ratio"],
                       [[a, f"{v['lab_style']:.1f}", f"{v['ours']:.1f}", f"{v['ratio']:.2f}x",
                         f"{v['ours_nchw']:.1f}", f"{v['ratio_nchw']:.2f}x"] for a, v in t.items()]))
    m = r["models"]
    parts.append(table(f"Hand-written vs torchvision, one SGD training step with the same weights, batch {r['model_batch']} at "
                       f"{r['model_size']} px, fp32 channels_last", ["model", "ours ms", "torchvision ms", "ratio"],
                       [[a, f"{v['ours_ms']:.1f}", f"{v['torchvision_ms']:.1f}", f"{v['ratio']:.3f}"]
                        for a, v in m.items()]))
    e = r["eval"]
    parts.append(table(f"Evaluation images/s, {r['eval_arch']} at {r['train_size']} px", ["plain", "TTA x8", "ratio"],
                       [[f"{e['plain']:.1f}", f"{e['tta']:.1f}", f"{e['tta'] / e['plain']:.3f}"]]))
    if "camera" in r:
        c = r["camera"]
        rows = [[who, f"{c[f'{who}, draft decode']:.0f}", f"{c[f'{who}, full decode']:.0f}",
                 f"{c[f'{who}, full decode'] / c[f'{who}, draft decode']:.2f}x"]
                for who in ("decode + find the field", "quality check", "prepare.py", "--images")
                if f"{who}, draft decode" in c]
        sizes = {mode: "x".join(map(str, c["decoded"][mode])) for mode in ("draft", "full")} if "decoded" in c else {}
        parts.append(table(f"One 12 MP camera JPEG ({CAMERA_SIZE[0]}x{CAMERA_SIZE[1]}) to a 512 px crop, ms",
                           ["path", f"draft decode (ours{', ' + sizes['draft'] if sizes else ''})",
                            f"full decode{' (' + sizes['full'] + ')' if sizes else ''}", "speed-up"], rows))
    mem = r["memory"]
    rows = [[f"{int(n):,}", f"{v['peak_pss_mb']:.0f}", f"{v['peak_rss_sum_mb']:.0f}"] for n, v in mem.items() if n != "ratio"]
    parts.append(table(f"Peak host memory of one training epoch, main process + {r['workers']} workers "
                       f"(ratio of PSS: {mem['ratio']:.3f})", ["training rows", "PSS MB", "sum of RSS MB"], rows))
    return "\n".join(parts)


def ratio(row: dict, a: str, b: str, fmt: str = "{:.2f}x") -> str:
    return fmt.format(row[a] / row[b]) if a in row and b in row else "not measured"


def report_cuda(r: dict) -> str:
    c = r["cuda"]
    archs = list(c["train"])
    configs = list(dict.fromkeys(k for a in archs for k in c["train"][a]))
    cell = lambda a, k: f"{c['train'][a][k]:.0f}" if k in c["train"][a] else "not measured"
    parts = [table(f"CUDA training images/s, {c['image_size']} px, batch {c['batch']} ({c['workers']} workers)",
                   ["configuration", *archs], [[k, *(cell(a, k) for a in archs)] for k in configs])]
    if "loader_only" in c:
        parts.append(f"Input pipeline alone (loader -> device, no model): {c['loader_only']:.0f} images/s\n")
    lab, real, synth = "lab-style (batch 4, fp32 NCHW, float pipeline)", "bf16 CL real pipeline", "bf16 CL synthetic"
    rows = [[a, ratio(c["train"][a], real, lab), ratio(c["train"][a], real, synth, "{:.0%}"),
             ratio(c["train"][a], synth, "fp32/tf32 CL synthetic"), ratio(c["train"][a], synth, "bf16 NCHW synthetic"),
             ratio(c["train"][a], "bf16 CL compile synthetic", synth)] for a in archs]
    parts.append(table("CUDA ratios", ["model", "ours (real pipeline) vs lab-style", "real pipeline vs synthetic",
                                       "bf16 vs fp32", "channels_last vs NCHW", "compile vs eager"], rows))
    if c.get("models"):
        parts.append(table("CUDA training step, ours vs torchvision with the same weights (bf16, channels_last)",
                           ["model", "ours ms", "torchvision ms", "ratio"],
                           [[a, f"{v['ours_ms']:.1f}", f"{v['torchvision_ms']:.1f}", f"{v['ratio']:.3f}"]
                            for a, v in c["models"].items()]))
    if c.get("eval"):
        parts.append(table("CUDA evaluation images/s, resnet50", ["plain", "TTA x8"],
                           [[f"{c['eval']['plain']:.0f}", f"{c['eval']['tta']:.0f}"]]))
    mem_rows = [[a, ", ".join(f"{b}: {g:.1f}" for b, g in m["peak_gib"].items()), f"{m['gib_per_image']:.3f}",
                 *(str(v) for v in m["largest_batch"].values())] for a, m in c["memory"].items()]
    parts.append(table(f"CUDA peak memory, bf16 channels_last training step at {c['image_size']} px "
                       "(GiB by batch size; largest batch keeps 1 GiB for the CUDA context)",
                       ["model", "peak GiB", "GiB per image", "largest batch 8 GB", "12 GB", "24 GB", "80 GB"],
                       mem_rows))
    return "\n".join(parts)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a seconds-long version of every measurement")
    p.add_argument("--cuda", action="store_true", help="the GPU table instead of the CPU one")
    p.add_argument("--export", action="store_true",
                   help="the deployment table instead: PyTorch eager vs onnxruntime fp32 and INT8 (needs "
                        "requirements-deploy.txt)")
    p.add_argument("--out", default=None, help="also write every figure to this JSON file")
    p.add_argument("--workers", type=int, default=None, help="loader processes (default: CPUs, at most 16)")
    p.add_argument("--threads", type=int, default=None,
                   help="with --export: compute threads of PyTorch and onnxruntime alike (default: each its own)")
    p.add_argument("--report", default=None, metavar="JSON", help="print the tables of an earlier --out file")
    args = p.parse_args(argv)
    if args.report:
        result = json.loads(Path(args.report).read_text())
        head = f"Machine: {result['machine']}\n\nCommand: `{result['command']}`\n\n"
        reports = {"cuda": report_cuda, "export": report_export}
        report = next((fn for key, fn in reports.items() if key in result), None)
        print(head + report(result) if report else report_cpu(result))
        return
    command = "python bench.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    if args.cuda and not torch.cuda.is_available():
        raise UserError("--cuda: no CUDA device is visible here")
    if args.export:
        deploy.require("bench.py --export")
        result = {"machine": machine(), "command": command, "export": bench_export(args.quick, args.threads)}
        text = f"Machine: {result['machine']}\n\nCommand: `{command}`\n\n" + report_export(result)
        print(text)
        if args.out:
            write_result(args.out, result)
        return
    workers = args.workers if args.workers is not None else dataloader.default_workers()
    result = {"machine": machine(), "command": command, "workers": workers}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        work = Path(tmp)
        if args.cuda:
            def save(partial):
                result["cuda"] = partial
                if args.out:
                    write_result(args.out, result)

            bench_cuda(work, args.quick, save)
            text = f"Machine: {result['machine']}\n\nCommand: `{command}`\n\n" + report_cuda(result)
        else:
            result.update(run_cpu(work, args.quick, workers))
            text = report_cpu(result)
    print(text)
    if args.out:
        write_result(args.out, result)


def write_result(out: str, result: dict) -> None:
    """--out: every figure as JSON, written whole (a CUDA run rewrites it after each part)."""
    write_text_atomic(out, json.dumps(result, indent=2, default=str))


def run_cpu(work: Path, quick: bool, workers: int) -> dict:
    q = quick
    pipeline_size = 512
    pipe = demo_set(work / "pipeline", n_train=24 if q else 200, size=pipeline_size)
    train_size, train_batch = (64, 16) if q else (128, 32)
    train_set = demo_set(work / "train", n_train=64 if q else 384, size=train_size)
    archs = ("resnet18",) if q else ("resnet18", "resnet50")
    model_size, model_batch = (64, 4) if q else (128, 16)
    return {
        "pipeline_size": pipeline_size,
        "input_pipeline": bench_input_pipeline(pipe, pipeline_size, rounds=1 if q else 15),
        "train_size": train_size, "train_batch": train_batch,
        "training": bench_training_cpu(train_set, archs, train_size, train_batch, workers),
        "model_size": model_size, "model_batch": model_batch,
        "models": bench_models(archs, model_size, model_batch, 2 if q else 12, torch.device("cpu"), amp=False),
        "eval_arch": "resnet18",
        "eval": bench_eval(train_set.train, "resnet18", train_size, 2 * train_batch, workers, torch.device("cpu"), False),
        "memory": bench_memory(work, 600 if q else 28_100, 32, workers),
        "camera": bench_camera_jpeg(work, rounds=1 if q else 7),
    }


if __name__ == "__main__":
    main()
