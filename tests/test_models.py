"""Our hand-written ResNets against torchvision's, the oracle, for every depth."""
import subprocess
import sys

import pytest
import torch
import torchvision

import models
from runtime import UserError

ARCHS = list(models.ARCHS)


def tv_model(arch, num_classes):
    return getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)


@pytest.mark.parametrize("arch", ARCHS)
def test_parameter_count_and_names_match_torchvision(arch):
    ours, theirs = models.build_model(arch, 1000), tv_model(arch, 1000)
    assert models.count_parameters(ours) == models.count_parameters(theirs)
    ours_shapes = {k: v.shape for k, v in ours.state_dict().items()}
    theirs_shapes = {k: v.shape for k, v in theirs.state_dict().items()}
    assert ours_shapes == theirs_shapes


def test_known_parameter_counts():
    assert models.count_parameters(models.resnet18(num_classes=1000)) == 11_689_512
    assert models.count_parameters(models.resnet50(num_classes=1000)) == 25_557_032


@pytest.mark.parametrize("arch", ARCHS)
def test_outputs_equal_torchvision_both_ways(arch):
    torch.manual_seed(0)
    ours = models.build_model(arch, 5)
    theirs = tv_model(arch, 5)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    # perturb BN statistics so eval mode exercises running_mean/var, not just the identity
    with torch.no_grad():
        for name, buf in ours.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
    ours_back = models.build_model(arch, 5)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ours_back.load_state_dict(theirs.state_dict(), strict=True)

    x = torch.randn(2, 3, 64, 64)
    for mode in ("eval", "train"):
        for m in (ours, theirs):
            m.train(mode == "train")
        with torch.no_grad():
            diff = (ours(x) - theirs(x)).abs().max().item()
        assert diff <= 1e-5, f"{arch} {mode}: max abs difference {diff}"
    # train mode updated the running stats identically
    for (k, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), k


def test_bottleneck_stride_on_3x3():
    block = models.resnet50().layer2[0]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)


def test_initialisation_like_torchvision():
    torch.manual_seed(0)
    ours = models.resnet18(zero_init_residual=True)
    conv = ours.layer1[0].conv1.weight
    fan_out = conv.shape[0] * conv.shape[2] * conv.shape[3]
    assert abs(conv.std().item() - (2 / fan_out) ** 0.5) < 0.1 * (2 / fan_out) ** 0.5
    assert torch.all(ours.bn1.weight == 1) and torch.all(ours.bn1.bias == 0)
    assert torch.all(ours.layer1[0].bn2.weight == 0)
    assert torch.all(models.resnet50(zero_init_residual=True).layer1[0].bn3.weight == 0)
    assert torch.all(models.resnet18().layer1[0].bn2.weight == 1)


def test_unknown_arch_is_a_user_error():
    with pytest.raises(UserError, match="resnet18, resnet34"):
        models.build_model("resnet19")


# --------------------------------------------------------------------------- ImageNet weights
@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network unreachable (test)")
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(models, "url_unreachable", lambda url, timeout=5: "the network is unreachable (test)")


@pytest.mark.parametrize("arch,filename", [("resnet18", "resnet18-f37072fd.pth"),
                                           ("resnet50", "resnet50-11ad3fa6.pth")])
def test_imagenet_weights_from_hub_cache(arch, filename, hub_cache, no_network):
    # A torchvision-format file of random weights stands in for the real download.
    torch.manual_seed(1)
    reference = tv_model(arch, 1000)
    hub_cache.mkdir(parents=True)
    torch.save(reference.state_dict(), hub_cache / filename)

    model, source = models.load_pretrained(arch, num_classes=5)
    assert source == str(hub_cache / filename)
    ref_state = reference.state_dict()
    for key, value in model.state_dict().items():
        if key.startswith("fc."):
            continue
        assert torch.equal(value, ref_state[key]), key
    assert model.fc.weight.shape == (5, ref_state["fc.weight"].shape[1])
    assert model.fc.bias.shape == (5,)


def test_resnet50_v1_file_used_when_v2_absent(hub_cache, no_network):
    hub_cache.mkdir(parents=True)
    torch.save(tv_model("resnet50", 1000).state_dict(), hub_cache / "resnet50-0676ba61.pth")
    _, source = models.load_pretrained("resnet50")
    assert source.endswith("resnet50-0676ba61.pth")


def test_explicit_weights_path(tmp_path):
    path = tmp_path / "my.pth"
    reference = tv_model("resnet18", 1000)
    torch.save(reference.state_dict(), path)
    model, _ = models.load_pretrained("resnet18", weights=path)
    assert torch.equal(model.conv1.weight, reference.conv1.weight)


def test_weights_of_another_arch_rejected(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(tv_model("resnet18", 1000).state_dict(), path)
    with pytest.raises(UserError, match="does not hold resnet50 weights"):
        models.load_pretrained("resnet50", weights=path)


def test_missing_weights_offline_names_url_and_path(hub_cache, no_network):
    with pytest.raises(UserError) as err:
        models.load_pretrained("resnet18")
    message = str(err.value)
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert str(hub_cache / "resnet18-f37072fd.pth") in message


def test_corrupt_cached_file_is_a_user_error(hub_cache):
    hub_cache.mkdir(parents=True)
    (hub_cache / "resnet18-f37072fd.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="delete it and download it again"):
        models.load_pretrained("resnet18")


def test_flops_of_resnet50_match_torchvision_figure():
    # torchvision documents 4.09 GMACs for ResNet50 at 224 px; FlopCounterMode counts 2 per MAC.
    gflops = models.count_flops(models.resnet50(num_classes=1000), 224) / 1e9
    assert abs(gflops - 2 * 4.09) < 0.02


def test_model_table_cli(repo_root):
    out = subprocess.run([sys.executable, "models.py", "--sizes", "64"], cwd=repo_root,
                         capture_output=True, text=True, check=True).stdout
    assert "| resnet18 | BasicBlock | 11,179,077 |" in out
    assert len([line for line in out.splitlines() if line.startswith("| resnet")]) == 5
