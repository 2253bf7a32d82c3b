# one-off device diagnostic (not committed): where does the real pipeline lose against synthetic data?
import json, os, sys, tempfile, time
from pathlib import Path
import numpy as np, torch
import bench, dataloader as data
out = Path(os.environ.get("OUT", "gpu-out")); out.mkdir(exist_ok=True)
dev = torch.device("cuda"); torch.backends.cudnn.benchmark = True
res = {}
def save(): (out / "diag.json").write_text(json.dumps(res, indent=1)); print(res, flush=True)
with tempfile.TemporaryDirectory() as t:
    f = bench.demo_set(Path(t) / "d", n_train=2560, size=512)
    for w in (16, 14, 12, 8):
        res[f"loader w{w}"] = bench.loader_rate(f.train, 512, 64, w, dev); save()
    for arch in ("resnet50", "resnet18"):
        res[f"{arch} synthetic"] = bench.ours_train_rate(arch, bench.DeviceBatches(30, 64, 512, dev), dev, True, True, False)
        for w in (16, 14, 12):
            res[f"{arch} real w{w}"] = bench.ours_train_rate(arch, bench.real_loader(f.train, 512, 64, w, dev), dev, True, True, False, epochs=3)
            save()
