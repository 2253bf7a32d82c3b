"""Hand-written ResNet18/34/50/101/152 (He et al. 2015, v1.5) and their ImageNet weights.

Module and parameter names are torchvision's, so its state_dicts load here with strict=True
and ours load into torchvision.models.resnetXX. `python models.py` prints the model table.
"""
from __future__ import annotations

import os
import sys
from functools import partial
from pathlib import Path

import torch
from torch import nn

from runtime import NUM_GRADES, Parser, UserError, exit_on_user_error, read_torch_file


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and a shortcut (ResNet18/34)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (ResNet50/101/152).

    The stride sits on the 3x3 convolution (ResNet v1.5), as in torchvision's ImageNet weights;
    the original paper put it on the first 1x1, which the weights were not trained for.
    """

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv1x1(in_planes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int],
                 num_classes: int = NUM_GRADES, zero_init_residual: bool = False):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            # Each block then starts as the identity, which helps large-batch training
            # (Goyal et al. 2017, "Accurate, Large Minibatch SGD").
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.in_planes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.in_planes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.in_planes, planes, stride, downsample)]
        self.in_planes = planes * block.expansion
        layers += [block(self.in_planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled output of the last residual stage, what fc reads (512 or 2048 per image): what the
        two-eye stage (twoeye.py) reads of each eye."""
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        return torch.flatten(x, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


ARCHS = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
    "resnet152": (Bottleneck, [3, 8, 36, 3]),
}


def build_model(arch: str, num_classes: int = NUM_GRADES, zero_init_residual: bool = False) -> ResNet:
    if arch not in ARCHS:
        raise UserError(f"unknown model '{arch}'; choose one of {', '.join(ARCHS)}")
    block, layers = ARCHS[arch]
    return ResNet(block, layers, num_classes=num_classes, zero_init_residual=zero_init_residual)


resnet18 = partial(build_model, "resnet18")
resnet34 = partial(build_model, "resnet34")
resnet50 = partial(build_model, "resnet50")
resnet101 = partial(build_model, "resnet101")
resnet152 = partial(build_model, "resnet152")


# torchvision's ImageNet files, best first. ResNet50/101/152 have a V2 recipe (80.9 % top-1 for
# ResNet50 against 76.1 % for V1); a cached V1 file is used when the V2 one is absent.
_TV = "https://download.pytorch.org/models/"
IMAGENET_WEIGHTS = {
    "resnet18": [_TV + "resnet18-f37072fd.pth"],
    "resnet34": [_TV + "resnet34-b627a593.pth"],
    "resnet50": [_TV + "resnet50-11ad3fa6.pth", _TV + "resnet50-0676ba61.pth"],
    "resnet101": [_TV + "resnet101-cd907fc2.pth", _TV + "resnet101-63fe2227.pth"],
    "resnet152": [_TV + "resnet152-f82ba261.pth", _TV + "resnet152-394f9c45.pth"],
}


def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _load_weight_file(path: Path, flag: str) -> dict:
    state = read_torch_file(flag, path)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # one of our own checkpoints passed as --weights
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{flag} {path} holds no state_dict (a dict of tensors)")
    return state


# A machine without network must learn that within seconds (make demo asks on every run); once the
# server has answered, the download itself may take as long as it takes.
PROBE_SECONDS = 5


def url_unreachable(url: str, timeout: float = PROBE_SECONDS) -> str | None:
    """None when `url`'s server answers within `timeout` seconds, else why not (one phrase)."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # the server answered; the download reports its own error
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        return f"no answer from {url.split('/')[2]} within {timeout:g} s" if "timed out" in str(reason) \
            else f"{url.split('/')[2]} is unreachable ({reason})"
    return None


def imagenet_state_dict(arch: str, weights: str | os.PathLike | None = None, progress: bool = True) -> tuple[dict, str]:
    """torchvision's ImageNet state_dict for `arch`, and where it came from.

    Order: an explicit file; torch hub's cache (TORCH_HOME); a download through torch.hub with
    the file name's hash prefix checked, after the server has answered a quick probe. Never falls
    back to random weights."""
    if weights is not None:
        return _load_weight_file(Path(weights), "--weights"), str(weights)
    cache = hub_checkpoint_dir()
    urls = IMAGENET_WEIGHTS[arch]
    for url in urls:
        cached = cache / url.rsplit("/", 1)[1]
        if cached.is_file():
            try:
                return _load_weight_file(cached, "the cached ImageNet file"), str(cached)
            except UserError as err:
                raise UserError(f"{err}; delete it and download it again") from None
    url = urls[0]
    target = cache / url.rsplit("/", 1)[1]
    how = f"download {url} and put it at {target}, or pass --weights PATH"
    reason = url_unreachable(url)
    if reason:
        raise UserError(f"ImageNet weights for {arch} are not cached and {reason}; {how}")
    try:
        state = torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=progress,
                                                   check_hash=True, weights_only=True)
    except Exception as err:
        raise UserError(f"ImageNet weights for {arch} are not cached and could not be downloaded "
                        f"({type(err).__name__}); {how}") from None
    return state, str(target)


def load_pretrained(arch: str, num_classes: int = NUM_GRADES, weights: str | os.PathLike | None = None,
                    zero_init_residual: bool = False, progress: bool = True) -> tuple[ResNet, str]:
    """Our `arch` with ImageNet weights in every layer but `fc`, which is new and `num_classes` wide."""
    model = build_model(arch, num_classes, zero_init_residual)
    state, source = imagenet_state_dict(arch, weights, progress)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.startswith("fc.")}
    wrong = sorted(set(expected) ^ set(state)) or [k for k in expected if state[k].shape != expected[k]]
    if wrong:
        raise UserError(f"{source} does not hold {arch} weights ({len(wrong)} tensors missing, "
                        f"unexpected or of another shape, e.g. {', '.join(wrong[:3])})")
    model.load_state_dict(state, strict=False)
    return model, source


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, image_size: int) -> int:
    """Floating-point operations (a multiply-add counts 2) of one forward pass of one image."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size))
    model.train(was_training)
    return counter.get_total_flops()


def model_table(num_classes: int = NUM_GRADES, sizes: tuple[int, ...] = (224, 512)) -> str:
    """The README's markdown table: depth, block, parameters, GFLOPs per image."""
    head = "| model | block | parameters | " + " | ".join(f"GFLOPs at {s}" for s in sizes) + " |"
    rows = [head, "|" + "---|" * (3 + len(sizes))]
    for arch, (block, _) in ARCHS.items():
        model = build_model(arch, num_classes)
        flops = [f"{count_flops(model, s) / 1e9:.2f}" for s in sizes]
        rows.append(f"| {arch} | {block.__name__} | {count_parameters(model):,} | " + " | ".join(flops) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = Parser(description="Print the model table (parameters, GFLOPs), or fetch ImageNet weights.")
    parser.add_argument("--num-classes", type=int, default=NUM_GRADES, help="output classes (default 5)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 512], help="image sizes (default 224 512)")
    parser.add_argument("--fetch", choices=list(ARCHS), metavar="ARCH",
                        help="make sure torchvision's ImageNet weights for ARCH are in torch hub's cache "
                             "(downloading them if the server answers within 5 s); exit 2 with the reason if not")
    args = parser.parse_args(argv)
    if args.fetch:
        _, source = imagenet_state_dict(args.fetch)
        print(f"ImageNet weights for {args.fetch}: {source}")
        return
    print(model_table(args.num_classes, tuple(args.sizes)))


if __name__ == "__main__":
    exit_on_user_error(main)(sys.argv[1:])
